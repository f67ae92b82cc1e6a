"""Async cores called from blocking code: a private event loop per call, or per stream."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator

import pytest

from producer.blocking import iterate_blocking, run_blocking

pytestmark = pytest.mark.timeout(60)


async def loop_of_call() -> asyncio.AbstractEventLoop:
    await asyncio.sleep(0)
    return asyncio.get_running_loop()


async def fails() -> None:
    await asyncio.sleep(0)
    raise LookupError("no such job")


def test_a_blocking_call_runs_on_a_loop_of_its_own_and_leaves_the_thread_s_loop_alone() -> None:
    # Given a thread whose current event loop was set by someone else
    mine = asyncio.new_event_loop()
    asyncio.set_event_loop(mine)
    try:
        # When two blocking calls run, one of them failing
        first, second = run_blocking(loop_of_call()), run_blocking(loop_of_call())
        with pytest.raises(LookupError, match="no such job"):
            run_blocking(fails())
        # Then each ran on a private loop, closed since, and the thread's loop is still its own
        assert first is not mine and second is not mine and first is not second
        assert first.is_closed() and second.is_closed()
        assert asyncio.get_event_loop_policy().get_event_loop() is mine
    finally:
        asyncio.set_event_loop(None)
        mine.close()


def test_a_blocking_call_made_inside_a_coroutine_still_returns() -> None:
    # Given sync code called from a coroutine (its thread's loop is running it)
    async def caller() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
        inner = run_blocking(loop_of_call())
        return asyncio.get_running_loop(), inner

    # When it makes a blocking call, then the call runs on another loop and returns
    outer, inner = asyncio.run(caller())
    assert inner is not outer


async def numbers(log: list[str]) -> AsyncGenerator[int, None]:
    """Yields 0 to 4 on the loop it started on (as a connection opened there needs), and
    notes where it closes."""
    loop = asyncio.get_running_loop()
    try:
        for n in range(5):
            await asyncio.sleep(0)
            assert asyncio.get_running_loop() is loop, "a step ran on another loop"
            yield n
    finally:
        await asyncio.sleep(0)  # awaiting while closing works
        log.append("closed on its loop" if asyncio.get_running_loop() is loop else "elsewhere")


def test_an_iterator_runs_every_step_on_one_loop_and_closes_the_generator_on_it() -> None:
    log: list[str] = []
    # When a blocking reader takes the whole stream
    assert list(iterate_blocking(numbers(log))) == [0, 1, 2, 3, 4]
    # Then its steps shared one loop, and it closed there
    assert log == ["closed on its loop"]
    # When a reader leaves after two items
    items = iterate_blocking(numbers(log))
    assert [next(items), next(items)] == [0, 1]
    items.close()
    # Then the generator was closed on its loop at once
    assert log == ["closed on its loop", "closed on its loop"]


def test_an_iterator_read_inside_a_coroutine_still_yields() -> None:
    log: list[str] = []

    async def caller() -> list[int]:
        return list(iterate_blocking(numbers(log)))

    assert asyncio.run(caller()) == [0, 1, 2, 3, 4]
    assert log == ["closed on its loop"]


CTRL_C = """
import asyncio, sys
from producer.blocking import run_blocking

async def wait():
    try:
        print("waiting", flush=True)
        await asyncio.sleep(60)
    finally:
        print("cleaned up", flush=True)

try:
    run_blocking(wait())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_cancels_a_blocking_call_then_raises_keyboard_interrupt() -> None:
    # Given a blocking call waiting on the main thread of a process
    process = subprocess.Popen(
        [sys.executable, "-c", CTRL_C], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "waiting\n"
    # When Ctrl-C comes
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    # Then the coroutine's finally ran, and the caller got KeyboardInterrupt at once
    assert out == "cleaned up\ninterrupted\n", err
    assert process.returncode == 0

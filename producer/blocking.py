"""Calling the client's async cores from blocking code, on an event loop of the call's own.

Waiting (:mod:`producer.waits`) and following (:mod:`producer.stream`) are written once, as
coroutines, for the HTTP API's event loop. Synchronous callers (``CompletionClient.wait``,
``stream``, the CLI) run them here on a private loop: :func:`run_blocking` one per call
(0.1 to 0.2 ms a call), :func:`iterate_blocking` one per stream, kept from its first step to its
close because what the stream opens on it (its ``redis.asyncio`` connection) belongs to
that loop. The private loop never becomes the thread's current loop, and on the main
thread Ctrl-C cancels the coroutine (so its ``finally`` runs) before
:class:`KeyboardInterrupt` is raised, as :func:`asyncio.run` does (a blocking call the
coroutine makes :func:`inline` ends first).

Sync code may be called from a coroutine (a blocking call inside ``async def``): that
thread's loop is busy running it, so the private loop then runs on a thread of its own
while the caller blocks, as a blocking call does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Offload(Protocol):
    """How a core runs a blocking call (a database read): :func:`asyncio.to_thread` or inline."""

    def __call__(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        """Run ``func(*args, **kwargs)``; its result once awaited."""
        ...


async def inline(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call on the loop itself: right on a private loop, where nothing else runs."""
    return func(*args, **kwargs)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _call(func: Callable[[], T]) -> T:
    """``func()`` here, or on a thread of its own when this thread's loop is running."""
    if not _loop_running():
        return func()
    with ThreadPoolExecutor(1, thread_name_prefix="cq-blocking") as pool:
        return pool.submit(func).result()


def _private_runner() -> asyncio.Runner:
    # A loop factory keeps the runner from making its loop the thread's current one (and
    # from resetting that to None when it closes).
    return asyncio.Runner(loop_factory=asyncio.new_event_loop)


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a private event loop; return its result or raise its error."""

    def run() -> T:
        with _private_runner() as runner:
            return runner.run(coro)

    return _call(run)


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def iterate_blocking(events: AsyncGenerator[T, None]) -> Generator[T, None, None]:
    """Yield what ``events`` yields, every step run on one private event loop; closing (or
    dropping) this iterator closes ``events`` on that loop, then the loop."""
    runner = _private_runner()
    try:
        while True:
            try:
                item = _call(lambda: runner.run(_await(anext(events))))
            except StopAsyncIteration:
                return
            yield item
    finally:
        try:
            _call(lambda: runner.run(_await(events.aclose())))
        finally:
            _call(runner.close)


__all__ = ["Offload", "inline", "iterate_blocking", "run_blocking"]

"""The engine's turns on a vLLM worker: flushes share it, a suspect job has it alone.

Real threads on the real lock (it is pure logic: no engine needed); each waits on
events with deadlines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from workers.isolation import Isolation

pytestmark = pytest.mark.timeout(30)


def within(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    """Wait until ``condition()``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_shared_calls_overlap_and_a_suspect_runs_alone_before_later_calls() -> None:
    isolation = Isolation()
    order: list[str] = []
    release = {name: threading.Event() for name in ("a", "b", "suspect", "late")}
    inside: set[str] = set()

    def hold(name: str, alone: bool) -> None:
        with isolation.alone() if alone else isolation.shared():
            order.append(name)
            inside.add(name)
            assert release[name].wait(10)
            inside.discard(name)

    def start(name: str, alone: bool = False) -> threading.Thread:
        thread = threading.Thread(target=hold, args=(name, alone))
        thread.start()
        return thread

    # Given two flushes generating side by side
    threads = [start("a"), start("b")]
    within(lambda: inside == {"a", "b"})
    # When a suspect job asks for the engine alone, and another flush comes after it
    threads.append(start("suspect", alone=True))
    time.sleep(0.2)  # the suspect is waiting: give it the chance to cut in wrongly
    threads.append(start("late"))
    time.sleep(0.2)
    # Then neither enters while the two run
    assert inside == {"a", "b"}
    release["a"].set()
    within(lambda: "a" not in inside)
    time.sleep(0.2)  # the waiting ones' chance to cut in wrongly
    assert inside == {"b"}
    # and once both ended, the suspect runs alone, and the later flush only after it
    release["b"].set()
    within(lambda: inside == {"suspect"})
    time.sleep(0.2)
    assert inside == {"suspect"}
    release["suspect"].set()
    within(lambda: inside == {"late"})
    release["late"].set()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert order == ["a", "b", "suspect", "late"] or order == ["b", "a", "suspect", "late"]

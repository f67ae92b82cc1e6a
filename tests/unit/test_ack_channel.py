"""The ack channel between a vLLM worker's model process and its main process, alone.

A real forked process connects and reports; the main side reads on kombu's real
event loop (as in the worker) or, as in a warm shutdown, on its own; a SIGKILL of
the reporting process is seen at once as the end of its connection.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event

import pytest
from kombu.asynchronous import Hub

from workers.acks import AckChannel

pytestmark = pytest.mark.timeout(60)

#: A stray message's task id: neither a job id nor a clean word.
ODD_ID = "not a job\nid"


def reporter(channel: AckChannel, go: Event, hold: bool) -> None:
    """The model process's side: connect, report once told to, then block (to be killed)."""
    channel.connect()
    go.wait(30)
    channel.report(["job-1", ODD_ID], committed=True)
    channel.report(["job-2"], committed=False)
    while hold:
        time.sleep(1)
    os._exit(0)


def spin(hub: Hub, condition: Callable[[], bool], timeout_s: float = 20) -> None:
    """Run the event loop until ``condition()``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the event loop did not deliver in time"
        hub.run_once()


def test_reports_reach_the_event_loop_and_a_killed_process_is_seen_at_once() -> None:
    # Given a channel made before the fork, watched on kombu's event loop
    channel, hub = AckChannel(), Hub()
    reports: list[tuple[str, bool]] = []
    lost: list[float] = []
    channel.watch(hub, lambda job, ok: reports.append((job, ok)), lambda: lost.append(1.0))
    context = multiprocessing.get_context("fork")
    go = context.Event()
    go.set()
    child = context.Process(target=reporter, args=(channel, go, True))
    child.start()
    try:
        # When the child reports two commits and one give-up
        spin(hub, lambda: len(reports) == 3)
        # Then each arrives whole, in order, odd ids and all; the connection stays up
        assert reports == [("job-1", True), (ODD_ID, True), ("job-2", False)]
        assert lost == []
        # When the child is killed
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        # Then its end of the connection is seen at once
        spin(hub, lambda: len(lost) == 1, timeout_s=5)
    finally:
        child.kill()
        child.join(5)
        hub.close()


def test_drain_reads_without_the_event_loop_until_done() -> None:
    # Given a channel whose model process reports and exits, read as a warm shutdown does
    channel, hub = AckChannel(), Hub()
    reports: list[tuple[str, bool]] = []
    lost: list[float] = []
    channel.watch(hub, lambda job, ok: reports.append((job, ok)), lambda: lost.append(1.0))
    context = multiprocessing.get_context("fork")
    go = context.Event()
    child = context.Process(target=reporter, args=(channel, go, True))
    child.start()
    try:
        spin(hub, lambda: channel.connected == 1)  # accepted on the loop, nothing reported
        assert reports == []
        # When the event loop stops, the child reports, and the shutdown drains until job-2
        go.set()
        assert channel.drain(lambda: any(job == "job-2" for job, _ in reports), 10)
        # Then every report arrived; a drain that cannot finish returns False at its deadline
        assert reports == [("job-1", True), (ODD_ID, True), ("job-2", False)]
        started = time.monotonic()
        assert not channel.drain(lambda: False, 0.5)
        assert 0.4 < time.monotonic() - started < 5
    finally:
        child.kill()
        child.join(5)
        hub.close()

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
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


@dataclass
class Watched:
    """A channel watched on kombu's event loop, its forked reporter, what the loop got."""

    channel: AckChannel
    hub: Hub
    go: Event
    child: BaseProcess
    reports: list[tuple[str, bool]] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)


@contextmanager
def watched_reporter() -> Iterator[Watched]:
    """A channel made before the fork, watched on a hub, and a forked :func:`reporter` that
    reports once ``go`` is set; the child is killed and the hub closed on the way out."""
    context = multiprocessing.get_context("fork")
    channel, hub, go = AckChannel(), Hub(), context.Event()
    child = context.Process(target=reporter, args=(channel, go, True))
    watched = Watched(channel, hub, go, child)
    channel.watch(
        hub,
        lambda job, ok: watched.reports.append((job, ok)),
        lambda: watched.lost.append(1.0),
    )
    child.start()
    try:
        yield watched
    finally:
        child.kill()
        child.join(5)
        hub.close()


def test_reports_reach_the_event_loop_and_a_killed_process_is_seen_at_once() -> None:
    # Given a channel made before the fork, watched on kombu's event loop
    with watched_reporter() as w:
        w.go.set()
        # When the child reports two commits and one give-up
        spin(w.hub, lambda: len(w.reports) == 3)
        # Then each arrives whole, in order, odd ids and all; the connection stays up
        assert w.reports == [("job-1", True), (ODD_ID, True), ("job-2", False)]
        assert w.lost == []
        # When the child is killed
        assert w.child.pid is not None
        os.kill(w.child.pid, signal.SIGKILL)
        # Then its end of the connection is seen at once
        spin(w.hub, lambda: len(w.lost) == 1, timeout_s=5)


def test_drain_reads_without_the_event_loop_until_done() -> None:
    # Given a channel whose model process reports and exits, read as a warm shutdown does
    with watched_reporter() as w:
        spin(w.hub, lambda: w.channel.connected == 1)  # accepted on the loop, nothing reported
        assert w.reports == []
        # When the event loop stops, the child reports, and the shutdown drains until job-2
        w.go.set()
        assert w.channel.drain(lambda: any(job == "job-2" for job, _ in w.reports), 10)
        # Then every report arrived; a drain that cannot finish returns False at its deadline
        assert w.reports == [("job-1", True), (ODD_ID, True), ("job-2", False)]
        started = time.monotonic()
        assert not w.channel.drain(lambda: False, 0.5)
        assert 0.4 < time.monotonic() - started < 5

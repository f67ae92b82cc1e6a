"""Leaving cleanly: a worker told to stop hands back what it has not started, at once.

On SIGTERM (Celery's warm shutdown), before anything else stops, :class:`LeaveStep`:

- stops the dispatcher releasing jobs to this worker (it reads the gate below);
- requeues every message buffered in the main process (the next flush forming, never
  sent to the model process): they go back to their lane queues within milliseconds;
- closes the claim gate (:class:`workers.runner.ClaimGate`) that the model process
  holds while it claims each group: once closed, the running flush claims nothing
  more, so every one of its jobs whose row is still ``queued`` will not start here,
  and their messages go back at once too (static engine); the flush itself ends
  after the group it is running, and says the same ids when it returns;
- keeps the heartbeat on the messages it still holds (the running group's) while it
  finishes, so a long group is not handed to another worker meanwhile, and after
  ``CQ_DRAIN_S`` kills the model process: the running group's messages then go back
  as a dead worker's do, and the jobs run again elsewhere (the first attempt's
  result, if it ever came, is fenced out by the second's claim).

So a stopping worker finishes what it started, hands back the rest at once, and is
gone within ``CQ_DRAIN_S`` (plus a second or two), which a Kubernetes pod's
``terminationGracePeriodSeconds`` covers with room to spare. Nothing is lost: every
message is acknowledged after its result is committed or requeued, and none runs
twice: a handed-back job was never claimed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import bootsteps

from completion_queue import TASK_GENERATE, Settings, heartbeat_interval_s, redact_url
from db import JobStatus, get_unfinished_jobs, make_engine, make_session_factory
from workers.heartbeat import held_tags, refresh
from workers.state import WorkerState

log = logging.getLogger(__name__)


class LeaveStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """On a warm shutdown, hand back the unstarted jobs and bound the drain by CQ_DRAIN_S.

    A worker step closed (the first thing a warm shutdown does to every worker step,
    before any stops) while the event loop no longer runs, so nothing else touches
    the buffer; before the consumer stops and the pool waits for the running flush.
    """

    requires = ("celery.worker.components:Pool",)

    def close(self, worker: Any) -> None:
        """Hand back what has not started; let the running group finish within CQ_DRAIN_S."""
        state: WorkerState = worker.app.cq_state
        # Within a second unless a claim is in flight (its commit retrying a lost database):
        # then the flush hands the rest back itself, once that group has run.
        settled = state.gate.close(timeout_s=1.0)
        task = worker.app.tasks[TASK_GENERATE]
        count = task.leave()
        if settled:
            try:
                count += task.hand_back_unstarted(partial(queued_jobs, state.settings))
            except Exception as exc:  # the database is away: the flush hands them back itself
                log.warning("could not read the running flush's jobs: %s", redact_url(str(exc)))
        log.info("warm shutdown: handed back %d message(s) of jobs not started", count)
        channel = getattr(getattr(worker.consumer, "task_consumer", None), "channel", None)
        drain = Drain(channel, state, pool_pids=lambda: _pool_pids(worker))
        threading.Thread(target=drain.run, name="cq-drain", daemon=True).start()


class Drain:
    """Renew the held messages while the running group finishes; kill it after CQ_DRAIN_S."""

    def __init__(
        self, channel: Any, state: WorkerState, *, pool_pids: Callable[[], list[int]]
    ) -> None:
        self.channel = channel
        self.deadline = time.monotonic() + state.settings.drain_s
        self.every_s = heartbeat_interval_s(state.settings)
        self.drain_s = state.settings.drain_s
        self.pool_pids = pool_pids

    def run(self) -> None:
        """Beat until the deadline (the worker exits before it, ending this daemon thread)."""
        while (left := self.deadline - time.monotonic()) > 0:
            time.sleep(min(self.every_s, left))
            if self.channel is not None and time.monotonic() < self.deadline:
                try:
                    refresh(self.channel, held_tags(self.channel), time.time())
                except Exception as exc:  # the broker is away, or the dicts changed under us
                    log.warning("heartbeat while draining failed: %s", redact_url(str(exc)))
        log.warning(
            "warm shutdown: the running jobs did not finish within CQ_DRAIN_S=%gs; "
            "killing the model process, their messages go back",
            self.drain_s,
        )
        for pid in self.pool_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def queued_jobs(settings: Settings, job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` whose rows are still queued."""
    ids = []
    for job_id in job_ids:
        with contextlib.suppress(ValueError):  # not a job id: the flush drops it
            ids.append(uuid.UUID(job_id))
    sessions = make_session_factory(make_engine(settings.resolved_database_url()))
    with sessions() as session:
        jobs = get_unfinished_jobs(session, job_ids=ids)
    return {str(job.id) for job in jobs if job.status is JobStatus.QUEUED}


def _pool_pids(worker: Any) -> list[int]:
    """The worker's pool processes (the one holding the model)."""
    try:
        return [int(pid) for pid in worker.pool.info.get("processes", [])]
    except Exception:
        return []

"""The worker's Celery app: the batched task, the model's start hook, the reaper's timer."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from celery import Celery, bootsteps, signals
from celery_batches import SimpleRequest

from completion_queue import (
    TASK_GENERATE,
    WORKER_CONSUMING_LINE,
    WORKER_READY_LINE,
    Settings,
    batch_line_rows,
    create_app,
    engine_rows,
    flush_size,
    reap,
    redact_url,
    resolve_broker_url,
)
from db import make_engine, make_session_factory
from workers.acks import AckChannel
from workers.dispatch import DispatchStep
from workers.events import install_job_events
from workers.heartbeat import UnackedHeartbeat
from workers.leave import LeaveStep
from workers.state import WorkerState
from workers.task import ModelBatches

log = logging.getLogger(__name__)


class ReaperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Run the reaper every ``CQ_REAP_INTERVAL_S`` on the timer of the worker's main process.

    A consumer step, like the heartbeat: scheduled again after the broker
    connection comes back (Celery clears its timer when the connection is lost).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.tref: Any = None
        self.sessions: Any = None

    def start(self, consumer: Any) -> None:
        """Schedule the reaper (never when the interval is 0)."""
        settings: Settings = consumer.app.cq_state.settings
        if settings.reap_interval_s > 0:
            self.tref = consumer.timer.call_repeatedly(
                settings.reap_interval_s, self.reap, (consumer.app,), priority=10
            )

    def stop(self, consumer: Any) -> None:
        """Cancel the schedule."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def reap(self, app: Celery) -> None:
        """One pass; a failure is logged and the next pass tries again."""
        settings: Settings = app.cq_state.settings
        try:
            if self.sessions is None:
                self.sessions = make_session_factory(make_engine(settings.resolved_database_url()))
            reap(settings, app, self.sessions)
        except Exception as exc:
            log.warning("reaper pass failed: %s", redact_url(str(exc)))


class AckChannelStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Read the model process's commit reports on the event loop (vLLM: see workers.acks).

    A consumer step: the event loop is reset when the broker connection is lost,
    and this step starts again with the new connection.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        """Watch the channel: acknowledge what it reports, requeue all if the process dies."""
        acks: AckChannel | None = consumer.app.cq_state.acks
        hub = consumer.controller.hub
        if acks is None or hub is None:
            return
        task = consumer.app.tasks[TASK_GENERATE]
        acks.watch(hub, task.report, task.requeue_held)


class AckDrainStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """On a warm shutdown, wait for the running jobs' commit reports before the pool stops.

    A worker step stopped after the consumer (which stops taking messages) and
    before the pool, while the broker connection is still open to acknowledge
    them; the event loop no longer runs then, so it reads the channel itself.
    """

    requires = ("celery.worker.components:Pool",)

    def stop(self, worker: Any) -> None:
        """Read reports until no job handed to the model process is left unreported."""
        state: WorkerState = worker.app.cq_state
        if state.acks is None:
            return
        task = worker.app.tasks[TASK_GENERATE]
        wait_s = (state.settings.job_timeout_s or 600.0) + state.settings.db_retry_s + 30.0
        if task.running_jobs():
            log.info("warm shutdown: waiting for the running jobs to commit")
        if not state.acks.drain(lambda: not task.running_jobs(), wait_s):
            log.warning("warm shutdown: running jobs did not report; their messages go back")


class ForgetBufferStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """On each (re)connection, drop what the batch task buffered from the connection before."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        """Reset the batch task's buffer and flush timer (see :class:`ModelBatches`)."""
        consumer.app.tasks[TASK_GENERATE].forget_buffer()


def create_worker_app(settings: Settings, broker_url: str | None = None) -> Celery:
    """Return the Celery app for a worker serving ``settings.model``."""
    url = broker_url or resolve_broker_url(settings)
    app = create_app(settings, url)
    # One pool process holds the model and generates while the main process keeps
    # receiving and acking messages. The main process never imports torch, so the
    # pool forks before CUDA starts.
    app.conf.worker_pool = "prefork"
    app.conf.worker_concurrency = 1
    # Celery kills a replacement pool process that has not said it is up 4 s after its
    # start; ours loads the model first (importing torch alone can take that long), so a
    # model process that died was replaced again and again, each killed mid-load.
    app.conf.worker_proc_alive_timeout = settings.model_load_timeout_s
    # vLLM: jobs join the running ones; the model process reports each commit on this channel.
    acks = AckChannel() if settings.engine == "vllm" else None
    state = WorkerState(settings, app.conf.broker_url, app, acks=acks)
    install_job_events(app, state.events)

    class DescribeStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Adds ``cq`` (model, device, batch settings, jobs done) to the worker's stats.

        A start-stop step, because only those are asked for ``info``.
        """

        def info(self, worker: Any) -> dict[str, Any]:
            return {"cq": state.describe()}

    app.steps["worker"].add(DescribeStep)
    app.steps["worker"].add(AckDrainStep)
    app.steps["worker"].add(LeaveStep)

    @signals.worker_process_init.connect(weak=False)
    def _load_model(**_: Any) -> None:
        try:
            state.start()
        except Exception:
            # Celery only logs a failing init handler, and its main process already says
            # ready: without a model this worker would take batches and hand them back for
            # ever. A cold shutdown instead: the worker stops, and its supervisor restarts it.
            log.critical(
                "could not load the model %s; stopping the worker", settings.model, exc_info=True
            )
            sys.stderr.flush()
            os.kill(os.getppid(), signal.SIGQUIT)
            os._exit(70)
        log.info("%s: model loaded and warmed up in pid %d", WORKER_READY_LINE, os.getpid())

    @signals.worker_process_shutdown.connect(weak=False)
    def _stop_model(**_: Any) -> None:
        state.stop()

    @signals.worker_ready.connect(weak=False)
    def _announce(sender: Any = None, **_: Any) -> None:
        log.info("%s: %s", WORKER_CONSUMING_LINE, getattr(sender, "hostname", ""))

    @app.task(
        base=ModelBatches,
        name=TASK_GENERATE,
        flush_every=flush_size(settings),
        flush_interval=max(settings.batch_wait_ms, 1) / 1000,
        # The static and paced engines run a flush's groups in turn; the continuous one
        # takes any count.
        group_size=settings.batch_size if settings.engine in ("static", "paced") else 0,
        joins=acks is not None,
        engine_rows=engine_rows(settings) if acks is not None else 0,
        batch_rows=batch_line_rows(settings) if acks is not None else 0,
        # The static engine's running flush runs interactive calls between two decoding steps.
        offers=state.offers if settings.engine == "static" else None,
        acks_late=True,
        ignore_result=True,
        listeners=state.listeners,
    )
    def generate(requests: list[SimpleRequest]) -> bool | list[str]:
        return state.run(requests)

    for step in (ReaperStep, UnackedHeartbeat, ForgetBufferStep, AckChannelStep, DispatchStep):
        app.steps["consumer"].add(step)
    app.cq_state = state
    return app

"""The worker side of the Celery app: the batched task and the model's start hook."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, bootsteps, signals
from celery_batches import SimpleRequest

from completion_queue.celery_app import create_app, resolve_broker_url
from completion_queue.constants import (
    TASK_GENERATE,
    TINY_MODEL_NAME,
    WORKER_CONSUMING_LINE,
    WORKER_READY_LINE,
)
from completion_queue.errors import FatalModelError
from completion_queue.settings import Settings, redact_url
from db.engine import make_engine, make_session_factory
from workers.batches import ModelBatches

log = logging.getLogger(__name__)


class WorkerState:
    """What one worker process holds: the resident model and the batch runner."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner: Any = None

    def start(self) -> None:
        """Load the model once, warm it up and connect to the database."""
        from workers.model import ModelRuntime
        from workers.runner import BatchRunner
        from workers.tiny import ensure_tiny_model

        settings = self.settings
        path = settings.model_path()
        if settings.model == TINY_MODEL_NAME:
            ensure_tiny_model(path)
        runtime = ModelRuntime(
            path, device=settings.device, dtype=settings.dtype, threads=settings.torch_threads
        )
        runtime.warm_up()
        engine = make_engine(settings.resolved_database_url())
        self.runner = BatchRunner(
            runtime,
            make_session_factory(engine),
            max_rows=settings.batch_size,
            job_timeout_s=settings.job_timeout_s,
            max_attempts=settings.max_attempts,
            db_retry_s=settings.db_retry_s,
        )
        log.info(
            "serving model %s on %s, batch size %d, batch wait %d ms, database %s",
            settings.model, runtime.device, settings.batch_size, settings.batch_wait_ms,
            redact_url(settings.resolved_database_url()),
        )  # fmt: skip

    def run(self, requests: list[SimpleRequest]) -> bool:
        """Run one micro-batch of task requests (task id = job id); True once committed.

        Anything else (an exception, which celery-batches logs and turns into
        None) sends the batch's messages back to the queue: see ModelBatches.
        """
        if self.runner is None:
            raise RuntimeError("worker model is not loaded (worker_process_init did not run)")
        try:
            self.runner.run([r.id for r in requests], worker=requests[0].hostname or "")
            return True
        except FatalModelError:
            # The model is unusable: exit without acking, so the messages are redelivered
            # and the supervisor starts a fresh process.
            log.critical("fatal model error; exiting", exc_info=True)
            sys.stderr.flush()
            os._exit(70)


class ReaperStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Run the reaper every ``CQ_REAP_INTERVAL_S`` on the timer of the worker's main process."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.sessions: Any = None

    def start(self, worker: Any) -> None:
        """Schedule the reaper (never when the interval is 0)."""
        settings: Settings = worker.app.cq_state.settings
        if settings.reap_interval_s > 0:
            self.tref = worker.timer.call_repeatedly(
                settings.reap_interval_s, self.reap, (worker.app,), priority=10
            )

    def stop(self, worker: Any) -> None:
        """Cancel the schedule."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def reap(self, app: Celery) -> None:
        """One pass; a failure is logged and the next pass tries again."""
        from completion_queue.reaper import reap

        settings: Settings = app.cq_state.settings
        try:
            if self.sessions is None:
                self.sessions = make_session_factory(make_engine(settings.resolved_database_url()))
            reap(settings, app, self.sessions)
        except Exception as exc:
            log.warning("reaper pass failed: %s", redact_url(str(exc)))


def create_worker_app(settings: Settings, broker_url: str | None = None) -> Celery:
    """Return the Celery app for a worker serving ``settings.model``."""
    app = create_app(settings, broker_url or resolve_broker_url(settings))
    # One pool process holds the model and generates while the main process keeps
    # receiving and acking messages. The main process never imports torch, so the
    # pool forks before CUDA starts.
    app.conf.worker_pool = "prefork"
    app.conf.worker_concurrency = 1
    state = WorkerState(settings)

    @signals.worker_process_init.connect(weak=False)
    def _load_model(**_: Any) -> None:
        state.start()
        log.info("%s: model loaded and warmed up in pid %d", WORKER_READY_LINE, os.getpid())

    @signals.worker_ready.connect(weak=False)
    def _announce(sender: Any = None, **_: Any) -> None:
        log.info("%s: %s", WORKER_CONSUMING_LINE, getattr(sender, "hostname", ""))

    @app.task(
        base=ModelBatches,
        name=TASK_GENERATE,
        flush_every=settings.batch_size * settings.batch_lookahead,
        flush_interval=max(settings.batch_wait_ms, 1) / 1000,
        acks_late=True,
        ignore_result=True,
    )
    def generate(requests: list[SimpleRequest]) -> bool:
        return state.run(requests)

    app.steps["worker"].add(ReaperStep)
    app.cq_state = state
    return app

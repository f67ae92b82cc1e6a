"""The worker side of the Celery app: the batched task and the model's start hook."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, bootsteps, signals
from celery_batches import SimpleRequest

from completion_queue.celery_app import create_app, prefetch_count, resolve_broker_url
from completion_queue.constants import (
    TASK_GENERATE,
    TINY_MODEL_NAME,
    WORKER_CONSUMING_LINE,
    WORKER_READY_LINE,
    queue_name,
)
from completion_queue.errors import FatalModelError
from completion_queue.metrics import Metrics, QueueDepthCollector
from completion_queue.settings import Settings, redact_url
from db.engine import make_engine, make_session_factory
from db.jobs import Job, Outcome
from db.models import JobStatus
from workers.batches import ModelBatches
from workers.events import JobEvents, install_job_events
from workers.metrics import WorkerMetrics

if TYPE_CHECKING:
    from workers.runner import BatchListener

log = logging.getLogger(__name__)


class JobCounts:
    """How many batches and jobs this worker finished (shown by Flower and `cq workers`).

    The counts live in shared memory made before any pool process forks, so the
    main process, which answers Flower's inspect calls, sees what a pool process ran.
    """

    def __init__(self) -> None:
        self._batches = multiprocessing.Value("q", 0)
        self._succeeded = multiprocessing.Value("q", 0)
        self._failed = multiprocessing.Value("q", 0)

    @property
    def batches(self) -> int:
        """Batches committed."""
        return int(self._batches.value)

    @property
    def succeeded(self) -> int:
        """Jobs that succeeded."""
        return int(self._succeeded.value)

    @property
    def failed(self) -> int:
        """Jobs that failed."""
        return int(self._failed.value)

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """Nothing to count until the batch is committed."""

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """Count the batch and its outcomes."""
        ok = sum(outcome.status is JobStatus.SUCCEEDED for outcome in outcomes)
        with self._batches.get_lock():
            self._batches.value += 1
        with self._succeeded.get_lock():
            self._succeeded.value += ok
        with self._failed.get_lock():
            self._failed.value += len(outcomes) - ok


class LoadedModel:
    """Where the model was loaded (device, dtype, seconds), shared like :class:`JobCounts`."""

    def __init__(self) -> None:
        self._device = multiprocessing.Array(ctypes.c_char, 64)
        self._dtype = multiprocessing.Array(ctypes.c_char, 32)
        self._load_s = multiprocessing.Value("d", -1.0)

    def set(self, *, device: str, dtype: str, load_s: float) -> None:
        """Record the loaded model's device, dtype and load time."""
        self._device.value = device.encode()[:63]
        self._dtype.value = dtype.encode()[:31]
        self._load_s.value = load_s

    @property
    def device(self) -> str | None:
        """The device, or None before the model is loaded."""
        return self._device.value.decode() or None

    @property
    def dtype(self) -> str | None:
        """The dtype (``float32``, ...), or None before the model is loaded."""
        return self._dtype.value.decode() or None

    @property
    def load_s(self) -> float | None:
        """Seconds to load and warm up, or None before the model is loaded."""
        return float(self._load_s.value) if self._load_s.value >= 0 else None


class WorkerState:
    """What one worker process holds: the resident model, the batch runner, its metrics."""

    def __init__(self, settings: Settings, broker_url: str, app: Celery | None = None) -> None:
        self.settings = settings
        self.broker_url = broker_url
        self.runner: Any = None
        self.events = JobEvents(app)
        self.counts = JobCounts()
        self.loaded = LoadedModel()
        self.metrics = Metrics()

    def start(self) -> None:
        """Load the model once, warm it up, connect to the database, serve /metrics."""
        from workers.model import ModelRuntime
        from workers.runner import BatchRunner
        from workers.tiny import ensure_tiny_model

        settings = self.settings
        path = settings.model_path()
        if settings.model == TINY_MODEL_NAME:
            ensure_tiny_model(path)
        started = time.perf_counter()
        runtime = ModelRuntime(
            path, device=settings.device, dtype=settings.dtype, threads=settings.torch_threads
        )
        runtime.warm_up()
        self.loaded.set(
            device=str(runtime.device),
            dtype=str(runtime.dtype).removeprefix("torch."),
            load_s=time.perf_counter() - started,
        )
        engine: Any = runtime
        max_rows = settings.batch_size
        if settings.engine == "continuous":
            from workers.continuous import ContinuousRuntime

            engine = ContinuousRuntime(
                runtime, max_new_tokens=settings.max_new_tokens_limit, max_rows=settings.batch_size
            )
            engine.warm_up()
            # The manager schedules rows itself: hand it the whole flush.
            max_rows = settings.batch_size * settings.batch_lookahead
        database = make_engine(settings.resolved_database_url())
        listeners: list[BatchListener] = [
            self.events,
            self.counts,
            WorkerMetrics(self.metrics, model=settings.model),
        ]
        self.runner = BatchRunner(
            engine,
            make_session_factory(database),
            max_rows=max_rows,
            listeners=listeners,
            job_timeout_s=settings.job_timeout_s,
            max_attempts=settings.max_attempts,
            db_retry_s=settings.db_retry_s,
        )
        self._start_metrics(runtime)
        log.info(
            "serving model %s on %s (%s engine), batch size %d, batch wait %d ms, database %s",
            settings.model, runtime.device, settings.engine, settings.batch_size,
            settings.batch_wait_ms,
            redact_url(settings.resolved_database_url()),
        )  # fmt: skip

    def _start_metrics(self, runtime: Any) -> None:
        settings, metrics = self.settings, self.metrics
        metrics.set_model_load(
            model=settings.model, device=str(runtime.device), seconds=self.loaded.load_s or 0.0
        )
        static = ("model", "queue", "device", "dtype", "batch_size", "batch_wait_ms", "prefetch")
        described = self.describe()
        metrics.worker_info.info({key: str(described[key]) for key in static})
        broker = redis.Redis.from_url(self.broker_url, socket_timeout=5)
        metrics.registry.register(QueueDepthCollector(broker, lambda: [settings.model]))
        if settings.metrics_port:
            metrics.serve(settings.metrics_port, settings.metrics_address)

    def describe(self) -> dict[str, Any]:
        """Return what this worker serves and has done: Flower's and `cq workers`' view."""
        settings, loaded = self.settings, self.loaded
        load_s = loaded.load_s
        return {
            "model": settings.model,
            "queue": queue_name(settings.model),
            "device": loaded.device or settings.device,
            "dtype": loaded.dtype or settings.dtype,
            "batch_size": settings.batch_size,
            "batch_wait_ms": settings.batch_wait_ms,
            "prefetch": prefetch_count(settings),
            "model_load_s": round(load_s, 3) if load_s is not None else None,
            "ready": load_s is not None,
            "batches": self.counts.batches,
            "jobs_succeeded": self.counts.succeeded,
            "jobs_failed": self.counts.failed,
            "jobs_done": self.counts.succeeded + self.counts.failed,
            "metrics_port": settings.metrics_port or None,
        }

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
    url = broker_url or resolve_broker_url(settings)
    app = create_app(settings, url)
    # One pool process holds the model and generates while the main process keeps
    # receiving and acking messages. The main process never imports torch, so the
    # pool forks before CUDA starts.
    app.conf.worker_pool = "prefork"
    app.conf.worker_concurrency = 1
    state = WorkerState(settings, app.conf.broker_url, app)
    install_job_events(app, state.events)

    class DescribeStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Adds ``cq`` (model, device, batch settings, jobs done) to the worker's stats.

        A start-stop step, because only those are asked for ``info``.
        """

        def info(self, worker: Any) -> dict[str, Any]:
            return {"cq": state.describe()}

    app.steps["worker"].add(DescribeStep)

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
        on_flush=state.events.received,
    )
    def generate(requests: list[SimpleRequest]) -> bool:
        return state.run(requests)

    app.steps["worker"].add(ReaperStep)
    app.cq_state = state
    return app

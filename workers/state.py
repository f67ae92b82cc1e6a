"""What one worker holds: the resident model and its runner, counts and metrics.

:class:`WorkerState` is built in the main process, before the pool forks; its
:meth:`WorkerState.start` runs in the pool process that keeps the model. The
counts and the loaded model's description live in shared memory, so the main
process, which answers Flower's and `cq workers`' inspect calls, sees them.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery_batches import SimpleRequest

from completion_queue import (
    TINY_MODEL_NAME,
    ConfigError,
    FatalModelError,
    Metrics,
    QueueDepthCollector,
    Settings,
    batch_line_rows,
    engine_rows,
    flush_size,
    prefetch_count,
    queue_name,
    redact_url,
    send_jobs,
)
from db import Job, JobStatus, Outcome, make_engine, make_session_factory
from engine import Engine, Routed
from workers.acks import AckChannel
from workers.dispatch import FairCharges
from workers.events import JobEvents
from workers.interactive import Offers
from workers.isolation import Isolation
from workers.listeners import BatchListener
from workers.metrics import WorkerMetrics
from workers.progress import ProgressWriter
from workers.runner import BatchRunner, ClaimGate

if TYPE_CHECKING:
    from engine.paced import PacedEngine
    from engine.static import StaticEngine
    from engine.vllm import VllmEngine

log = logging.getLogger(__name__)


class JobCounts(BatchListener):
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

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """Count the batch and its outcomes."""
        ok = sum(outcome.status is JobStatus.SUCCEEDED for outcome in outcomes)
        # A job cancelled while it ran is neither: it did not fail.
        failed = sum(outcome.status is JobStatus.FAILED for outcome in outcomes)
        with self._batches.get_lock():
            self._batches.value += 1
        with self._succeeded.get_lock():
            self._succeeded.value += ok
        with self._failed.get_lock():
            self._failed.value += failed


class LoadedModel:
    """Where the model was loaded (device, dtype, seconds), shared like :class:`JobCounts`."""

    def __init__(self) -> None:
        self._device = multiprocessing.Array(ctypes.c_char, 64)
        self._dtype = multiprocessing.Array(ctypes.c_char, 32)
        self._load_s = multiprocessing.Value("d", -1.0)
        self._chat = multiprocessing.Value("b", -1)
        self._threads = multiprocessing.Value("i", 0)

    def set(self, *, device: str, dtype: str, load_s: float, chat: bool, threads: int) -> None:
        """Record the loaded model's device, dtype, load time, whether it takes messages,
        and its process's torch CPU threads."""
        self._device.value = device.encode()[:63]
        self._dtype.value = dtype.encode()[:31]
        self._load_s.value = load_s
        self._chat.value = int(chat)
        self._threads.value = threads

    @property
    def chat(self) -> bool | None:
        """Whether the tokenizer has a chat template, or None before the model is loaded."""
        return None if self._chat.value < 0 else bool(self._chat.value)

    @property
    def device(self) -> str | None:
        """The device, or None before the model is loaded."""
        return self._device.value.decode() or None

    @property
    def dtype(self) -> str | None:
        """The dtype (``float32``, ...), or None before the model is loaded."""
        return self._dtype.value.decode() or None

    @property
    def threads(self) -> int | None:
        """torch's CPU threads in the model process, or None before the model is loaded."""
        return int(self._threads.value) or None

    @property
    def load_s(self) -> float | None:
        """Seconds to load and warm up, or None before the model is loaded."""
        return float(self._load_s.value) if self._load_s.value >= 0 else None


class WorkerState:
    """What one worker process holds: the resident model, the batch runner, its metrics."""

    def __init__(
        self,
        settings: Settings,
        broker_url: str,
        app: Celery | None = None,
        acks: AckChannel | None = None,
    ) -> None:
        """``acks``: flushes run in threads and report commits there (the vLLM engine)."""
        self.settings = settings
        self.acks = acks
        #: The flushes running in threads of the model process (with ``acks`` only).
        self._flushes: set[threading.Thread] = set()
        self._flushes_lock = threading.Lock()
        self.broker_url = broker_url
        self.app = app
        self.runner: BatchRunner | None = None
        self.engine: Engine | None = None
        self.events = JobEvents(app)
        self.counts = JobCounts()
        self.loaded = LoadedModel()
        self.metrics = Metrics()
        #: Closed by the main process when the worker stops: the model process's flush ends
        #: after its running group and hands back the groups it has not started.
        self.gate = ClaimGate()
        #: Interactive jobs the main process hands to the model process's running flush, run
        #: between two decoding steps (see workers.interactive).
        self.offers = Offers()
        #: Every hook on the worker's batches: task events, counts, Prometheus metrics.
        self.listeners: list[BatchListener] = [
            self.events,
            self.counts,
            WorkerMetrics(self.metrics, model=settings.model),
            FairCharges(broker_url, queue_name(settings.model)),
        ]

    def start(self) -> None:
        """Load the model once, warm it up, connect to the database, serve /metrics."""
        settings = self.settings
        if self.acks is not None:
            self.acks.connect()
        path = settings.model_path()
        no_model = settings.engine == "paced"
        if (
            settings.model == TINY_MODEL_NAME
            and not no_model
            and not Path(path, "config.json").exists()
        ):
            # The CLI builds it (cq up, cq worker, cq demo); a worker only loads models.
            raise ConfigError(
                f"the tiny model is not built at {path}: run `cq model make-tiny` "
                "(cq up, cq worker and cq demo build it before they start a worker)"
            )
        started = time.perf_counter()
        # Imported here, in the pool process that holds the model: the main process
        # never imports torch or vLLM (and nothing forks after CUDA starts).
        static: StaticEngine | VllmEngine | PacedEngine
        if no_model:
            from engine.paced import PacedEngine

            static = PacedEngine(step_s=settings.paced_step_ms / 1000)
        elif settings.engine == "vllm":
            # vLLM's venv has a transformers too old for the static engine: nothing falls back.
            from engine.vllm import VllmEngine

            static = VllmEngine(
                path,
                dtype=settings.dtype,
                # Two flushes and the interactive margin run at once (the worker buffers a
                # flush more, sent here as rows free: see workers.task). Batch lines leave
                # the margin free: an interactive call never waits for a row.
                max_rows=engine_rows(settings),
                batch_rows=batch_line_rows(settings),
                kv_rows=settings.batch_size,
                prefix_caching=settings.prefix_min_tokens > 0,
                threads=settings.torch_threads,
                progress_s=settings.progress_interval_ms / 1000,
            )
        else:
            from engine.static import StaticEngine

            static = StaticEngine(
                path,
                device=settings.device,
                dtype=settings.dtype,
                threads=settings.torch_threads,
                prefix_min_tokens=settings.prefix_min_tokens,
            )
        static.warm_up()
        self.loaded.set(
            device=str(static.device),
            dtype=str(static.dtype).removeprefix("torch."),
            load_s=time.perf_counter() - started,
            chat=bool(getattr(static.tokenizer, "chat_template", None)),
            threads=static.threads,
        )
        engine: Engine = static
        max_rows = settings.batch_size
        if settings.engine == "vllm":
            # vLLM schedules rows itself, as the continuous manager does: hand it the flush.
            max_rows = engine_rows(settings)
        elif settings.engine == "continuous":
            from engine.continuous import ContinuousEngine
            from engine.static import StaticEngine

            assert isinstance(static, StaticEngine)

            continuous = ContinuousEngine(
                static, max_new_tokens=settings.max_new_tokens_limit, max_rows=settings.batch_size
            )
            continuous.warm_up()
            # What the manager cannot run exactly runs on the static engine of the same model.
            engine = Routed(continuous, static)
            # The manager schedules rows itself: hand it the whole flush.
            max_rows = flush_size(settings)
        self.engine = engine
        sessions = make_session_factory(make_engine(settings.resolved_database_url()))
        progress = ProgressWriter(
            sessions,
            decode=partial(static.tokenizer.decode, skip_special_tokens=True),
            ends=[*static.eos_ids, static.pad_id],
            interval_ms=settings.progress_interval_ms,
            broker_url=self.broker_url,
        )
        self.runner = BatchRunner(
            engine,
            sessions,
            max_rows=max_rows,
            listeners=[*self.listeners, progress],
            job_timeout_s=settings.job_timeout_s,
            max_attempts=settings.max_attempts,
            db_retry_s=settings.db_retry_s,
            model=settings.model,
            forward=self._forward,
            progress=progress,
            prefix_tokens=settings.prefix_min_tokens,
            # Flushes run side by side here: a suspect job must wait to have the engine alone.
            isolation=Isolation() if self.acks is not None else None,
            # vLLM runs every job of a flush at once: there is no group left to hand back.
            gate=self.gate if self.acks is None else None,
            offers=self.offers if settings.engine == "static" else None,
        )
        self._start_metrics(static)
        log.info(
            "serving model %s on %s (%s engine), batch size %d, batch wait %d ms, database %s",
            settings.model,
            static.device,
            settings.engine,
            settings.batch_size,
            settings.batch_wait_ms,
            redact_url(settings.resolved_database_url()),
        )

    def _forward(self, jobs: Sequence[Job]) -> None:
        """Send jobs for other models to their own queues (see BatchRunner._route)."""
        if self.app is None:
            raise RuntimeError("this worker has no Celery app to send jobs on with")
        send_jobs(self.app, jobs)

    def _start_metrics(self, static: Any) -> None:
        settings, metrics = self.settings, self.metrics
        metrics.set_model_load(
            model=settings.model, device=str(static.device), seconds=self.loaded.load_s or 0.0
        )
        static = ("model", "queue", "device", "dtype", "batch_size", "batch_wait_ms", "prefetch")
        described = self.describe()
        metrics.worker_info.info({key: str(described[key]) for key in static})
        broker = redis.Redis.from_url(self.broker_url, socket_timeout=5)
        metrics.registry.register(QueueDepthCollector(broker, lambda: [settings.model]))
        if settings.metrics_port:
            metrics.serve(settings.metrics_port, settings.metrics_address)

    def stop(self) -> None:
        """Let running flushes commit, then stop the engine's background work, if any."""
        with self._flushes_lock:
            flushes = list(self._flushes)
        if flushes:
            log.info("waiting for %d running flush(es) to commit", len(flushes))
        # No job runs past its time limit in the engine; the commit's retries come on top.
        wait_s = (self.settings.job_timeout_s or 600.0) + self.settings.db_retry_s + 30.0
        deadline = time.monotonic() + wait_s
        for thread in flushes:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def describe(self) -> dict[str, Any]:
        """Return what this worker serves and has done: Flower's and `cq workers`' view."""
        settings, loaded = self.settings, self.loaded
        load_s = loaded.load_s
        return {
            "model": settings.model,
            "queue": queue_name(settings.model),
            "device": loaded.device or settings.device,
            "dtype": loaded.dtype or settings.dtype,
            "engine": settings.engine,
            "threads": loaded.threads,
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

    def run(self, requests: list[SimpleRequest]) -> bool | list[str]:
        """Run one micro-batch of task requests (task id = job id); True once committed, or
        the ids of the jobs handed back unstarted (the worker is leaving; the rest committed).

        Anything else (an exception, which celery-batches logs and turns into
        None) sends the batch's messages back to the queue: see ModelBatches.
        """
        if self.runner is None:
            raise RuntimeError("worker model is not loaded (worker_process_init did not run)")
        if self.acks is not None:
            job_ids, worker = [r.id for r in requests], requests[0].hostname or ""
            thread = threading.Thread(
                target=self._run_reported, args=(job_ids, worker), name="cq-flush"
            )
            with self._flushes_lock:
                self._flushes.add(thread)
            thread.start()
            return True
        try:
            job_ids, worker = [r.id for r in requests], requests[0].hostname or ""
            flush = self.runner.run_flush(job_ids, worker=worker)
            return flush.handed_back or True
        except FatalModelError:
            # The model is unusable: exit without acking, so the messages are redelivered
            # and the supervisor starts a fresh process.
            log.critical("fatal model error; exiting", exc_info=True)
            sys.stderr.flush()
            os._exit(70)

    def _run_reported(self, job_ids: list[str], worker: str) -> None:
        """Run one flush in this thread; report its jobs committed, or given up, on the channel."""
        assert self.runner is not None and self.acks is not None
        committed = False
        try:
            self.runner.run(job_ids, worker=worker)
            committed = True
        except FatalModelError:
            # As in run(): the messages are requeued when the main process sees this one end.
            log.critical("fatal model error; exiting", exc_info=True)
            sys.stderr.flush()
            os._exit(70)
        except Exception:
            log.exception("batch of %d not committed; its messages go back", len(job_ids))
        finally:
            try:
                self.acks.report(job_ids, committed=committed)
            except Exception:
                # Unacknowledged, they go back to the queue when this worker stops; a
                # finished job's second delivery changes nothing.
                log.exception("could not report %d job(s) on the ack channel", len(job_ids))
            with self._flushes_lock:
                self._flushes.discard(threading.current_thread())

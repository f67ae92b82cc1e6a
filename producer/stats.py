"""`cq stats` and `cq workers`: the cluster as the database, Redis and the live workers see it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from rich.console import Group
from rich.table import Table

from completion_queue.celery_app import queue_depth
from completion_queue.constants import queue_name
from completion_queue.settings import Settings
from db.engine import make_engine, make_session_factory
from db.jobs import utcnow
from db.models import JobStatus
from db.stats import count_by_status, finished_since, queued_models
from producer.demo import percentile

#: The latency percentiles `cq stats` reports.
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One live worker: what it serves and what it has done (from its Celery stats)."""

    hostname: str
    model: str | None
    queue: str | None
    device: str | None
    dtype: str | None
    batch_size: int | None
    batch_wait_ms: int | None
    jobs_done: int
    jobs_failed: int
    batches: int
    uptime_s: int | None
    pid: int | None


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """What `cq stats` shows: jobs per status, recent throughput and latency, queues, workers."""

    statuses: dict[str, int]
    window_s: float
    finished: int
    jobs_per_s: float
    tokens_per_s: float
    latency_s: dict[str, float | None]
    queue_wait_s: dict[str, float | None]
    queues: dict[str, int]
    workers: list[WorkerInfo]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return dataclasses.asdict(self)


def live_workers(app: Celery, *, timeout_s: float = 1.0) -> list[WorkerInfo]:
    """Ask every worker for its stats (Celery's ``inspect stats``); return those that answer."""
    replies: dict[str, Any] = app.control.inspect(timeout=timeout_s).stats() or {}
    workers = []
    for hostname, stats in sorted(replies.items()):
        cq = stats.get("cq") or {}
        workers.append(
            WorkerInfo(
                hostname=hostname,
                model=cq.get("model"),
                queue=cq.get("queue"),
                device=cq.get("device"),
                dtype=cq.get("dtype"),
                batch_size=cq.get("batch_size"),
                batch_wait_ms=cq.get("batch_wait_ms"),
                jobs_done=int(cq.get("jobs_done", 0)),
                jobs_failed=int(cq.get("jobs_failed", 0)),
                batches=int(cq.get("batches", 0)),
                uptime_s=stats.get("uptime"),
                pid=stats.get("pid"),
            )
        )
    return workers


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": (percentile(values, q) if values else None) for q in PERCENTILES}


def cluster_stats(
    settings: Settings, app: Celery, *, window_s: float, timeout_s: float = 1.0
) -> ClusterStats:
    """Gather jobs per status and the last ``window_s`` seconds from the database, queue
    depths from Redis and the live workers from Celery."""
    engine = make_engine(settings.resolved_database_url())
    try:
        with make_session_factory(engine)() as session:
            counts = count_by_status(session)
            recent = finished_since(session, since=utcnow() - timedelta(seconds=window_s))
            models = set(queued_models(session))
    finally:
        engine.dispose()
    ran = [job for job in recent if job.status is not JobStatus.CANCELLED]
    waits = [(job.started_at - job.created_at).total_seconds() for job in ran if job.started_at]
    workers = live_workers(app, timeout_s=timeout_s)
    models |= {settings.model} | {w.model for w in workers if w.model}
    client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=5)
    try:
        queues = {model: queue_depth(client, queue_name(model)) for model in sorted(models)}
    finally:
        client.close()
    return ClusterStats(
        statuses={status.value: count for status, count in counts.items()},
        window_s=window_s,
        finished=len(ran),
        jobs_per_s=len(ran) / window_s,
        tokens_per_s=sum(job.completion_tokens for job in ran) / window_s,
        latency_s=_percentiles([job.latency_s for job in ran]),
        queue_wait_s=_percentiles(waits),
        queues=queues,
        workers=workers,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def workers_table(workers: Sequence[WorkerInfo]) -> Table:
    """Return a table of live workers: model, device, batch settings, jobs done."""
    table = Table(title=f"{len(workers)} live worker(s)")
    table.add_column("worker", overflow="fold")
    table.add_column("model", overflow="fold")
    for column in ("device", "batch", "wait ms", "jobs done", "failed", "up s"):
        table.add_column(column, no_wrap=True)
    for w in workers:
        table.add_row(
            w.hostname, w.model or "?", w.device or "?", str(w.batch_size or "?"),
            str(w.batch_wait_ms if w.batch_wait_ms is not None else "?"),
            str(w.jobs_done), str(w.jobs_failed), str(w.uptime_s or "?"),
        )  # fmt: skip
    return table


def stats_view(stats: ClusterStats) -> Group:
    """Return what `cq stats` prints: statuses, recent throughput and latency, queues, workers."""
    jobs = Table(title="jobs")
    for status in stats.statuses:
        jobs.add_column(status, justify="right")
    jobs.add_row(*(str(n) for n in stats.statuses.values()))
    recent = Table(title=f"last {stats.window_s:.0f} s")
    for column in ("finished", "jobs/s", "tokens/s", "latency p50 / p95 / p99", "queue wait p50"):
        recent.add_column(column, justify="right")
    recent.add_row(
        str(stats.finished), f"{stats.jobs_per_s:.2f}", f"{stats.tokens_per_s:.1f}",
        " / ".join(_ms(v) for v in stats.latency_s.values()), _ms(stats.queue_wait_s["p50"]),
    )  # fmt: skip
    queues = Table(title="queues")
    queues.add_column("model", overflow="fold")
    queues.add_column("queue", overflow="fold")
    queues.add_column("waiting", justify="right")
    for model, depth in stats.queues.items():
        queues.add_row(model, queue_name(model), str(depth))
    return Group(jobs, recent, queues, workers_table(stats.workers))

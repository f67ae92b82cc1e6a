"""The cluster as the database, Redis and the live workers see it: `cq stats`, `cq workers`,
``GET /v1/models``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from completion_queue import BrokerUnavailable, Settings, queue_depth, queue_name, redact_url
from db import (
    JobStatus,
    count_by_status,
    finished_since,
    make_engine,
    make_session_factory,
    queued_models,
    utcnow,
)
from producer.backlog import TenantLoad, tenant_loads

#: The latency percentiles `cq stats` reports.
PERCENTILES = (50, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) of ``values`` by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One live worker: what it serves and what it has done (from its Celery stats)."""

    hostname: str
    model: str | None
    queue: str | None
    device: str | None
    dtype: str | None
    #: static, continuous or vllm (what ``CQ_ENGINE=auto`` picked, on such a worker).
    engine: str | None
    #: torch's CPU threads in the model process.
    threads: int | None
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
    #: Per model and tenant: queued jobs and tokens, and tokens served in the window.
    tenants: list[TenantLoad]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return dataclasses.asdict(self)


#: How long `cq stats` and `cq workers` wait for the broker to accept a connection.
BROKER_CONNECT_TIMEOUT_S = 2.0

#: What a broker that is down or unreachable raises, through kombu or redis-py.
BROKER_ERRORS = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)


def _unavailable(app: Celery, exc: BaseException) -> BrokerUnavailable:
    url = redact_url(app.conf.broker_url)
    return BrokerUnavailable(f"the broker cannot be reached at {url}: {redact_url(str(exc))}")


@contextlib.contextmanager
def broker_client(app: Celery) -> Iterator[redis.Redis]:
    """A short-lived redis-py client on ``app``'s broker, for a reader's few commands.

    Raises:
        BrokerUnavailable: the broker does not accept a connection or answer in time.
    """
    client = redis.Redis.from_url(
        app.conf.broker_url, socket_timeout=5, socket_connect_timeout=BROKER_CONNECT_TIMEOUT_S
    )
    try:
        yield client
    except BROKER_ERRORS as exc:
        raise _unavailable(app, exc) from None
    finally:
        client.close()


def live_workers(app: Celery, *, timeout_s: float = 1.0) -> list[WorkerInfo]:
    """Ask every worker for its stats (Celery's ``inspect stats``); return those that answer.

    Raises:
        BrokerUnavailable: the broker does not accept a connection (tried once, not
            retried as a worker would: a reader answers at once).
    """
    options = {"socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S}
    try:
        with app.connection_for_write(transport_options=options) as connection:
            connection.ensure_connection(max_retries=0)
            inspect = app.control.inspect(timeout=timeout_s, connection=connection)
            replies: dict[str, Any] = inspect.stats() or {}
    except BROKER_ERRORS as exc:
        raise _unavailable(app, exc) from None
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
                engine=cq.get("engine"),
                threads=cq.get("threads"),
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
    workers = live_workers(app, timeout_s=timeout_s)
    engine = make_engine(settings.resolved_database_url())
    try:
        with make_session_factory(engine)() as session, broker_client(app) as client:
            counts = count_by_status(session)
            recent = finished_since(session, since=utcnow() - timedelta(seconds=window_s))
            models = set(queued_models(session))
            models |= {settings.model} | {w.model for w in workers if w.model}
            queues = {model: queue_depth(client, queue_name(model)) for model in sorted(models)}
            tenants = tenant_loads(session, client, window_s=window_s)
    finally:
        engine.dispose()
    ran = [job for job in recent if job.status is not JobStatus.CANCELLED]
    waits = [(job.started_at - job.created_at).total_seconds() for job in ran if job.started_at]
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
        tenants=tenants,
    )

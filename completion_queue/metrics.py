"""Prometheus metrics of completion-queue, shared by the worker and the HTTP API.

Every metric lives in a registry of its own (not the process-global one), so a
process, or a test, can hold several. Collectors that read Redis or the
database do so at scrape time. Names follow Prometheus conventions: a ``cq_``
prefix, base units in the name, ``_total`` on counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from completion_queue.celery_app import queue_depth
from completion_queue.constants import queue_name
from completion_queue.settings import redact_url

log = logging.getLogger(__name__)

#: Seconds: from a few milliseconds (tiny model, idle queue) to an hour (long jobs, backlog).
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Jobs per micro-batch: powers of two up to the largest batch size setting.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The job metrics one process exports, in their own registry.

    The worker observes every batch it runs; the HTTP API can observe what it
    submits and register :class:`JobStatusCollector` and
    :class:`QueueDepthCollector` on the same registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "cq_jobs",
            "Jobs finished by this process, by model and status.",
            ["model", "status"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "cq_request_queue_time_seconds",
            "Seconds from submit to the start of the job's batch.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.first_token = Histogram(
            "cq_time_to_first_token_seconds",
            "Seconds from submit to the job's first token.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.generation = Histogram(
            "cq_generation_seconds",
            "Seconds one micro-batch spent generating.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.latency = Histogram(
            "cq_job_latency_seconds",
            "End-to-end seconds from submit to the committed result.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "cq_batch_size",
            "Jobs per micro-batch.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "cq_completion_tokens",
            "Tokens generated (all choices), by model.",
            ["model"],
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "cq_tokens_per_second",
            "Generated tokens per second of generation in the last batch.",
            ["model"],
            registry=r,
        )
        self.model_load = Gauge(
            "cq_model_load_seconds",
            "Seconds the resident model took to load and warm up.",
            ["model", "device"],
            registry=r,
        )
        self.submitted = Counter(
            "cq_jobs_submitted",
            "Jobs queued by this process (the API), by model.",
            ["model"],
            registry=r,
        )
        self.worker_info = Info(
            "cq_worker",
            "What this worker serves: model, device, dtype, batch settings.",
            registry=r,
        )

    def observe_started(self, *, model: str, queue_wait_s: float) -> None:
        """Record how long a job waited between submit and the start of its batch."""
        self.queue_wait.labels(model=model).observe(max(queue_wait_s, 0.0))

    def observe_first_token(self, *, model: str, seconds: float) -> None:
        """Record how long a job waited between submit and its first generated token."""
        self.first_token.labels(model=model).observe(max(seconds, 0.0))

    def observe_finished(self, *, model: str, status: str, latency_s: float) -> None:
        """Count one finished job and record its end-to-end latency."""
        self.jobs.labels(model=model, status=status).inc()
        self.latency.labels(model=model).observe(max(latency_s, 0.0))

    def observe_batch(self, *, model: str, jobs: int, generation_s: float, tokens: int) -> None:
        """Record one micro-batch: its size, generation time and tokens."""
        self.batch_size.labels(model=model).observe(jobs)
        self.generation.labels(model=model).observe(generation_s)
        self.tokens.labels(model=model).inc(tokens)
        if generation_s > 0:
            self.tokens_per_second.labels(model=model).set(tokens / generation_s)

    def set_model_load(self, *, model: str, device: str, seconds: float) -> None:
        """Record how long the resident model took to load."""
        self.model_load.labels(model=model, device=device).set(seconds)

    def expose(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve(self, port: int, address: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``address:port`` from a daemon thread; return the server."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", address, port)
        return server


class QueueDepthCollector(Collector):
    """``cq_queue_depth{model,queue}``: messages waiting per model queue, read at scrape time."""

    def __init__(self, client: redis.Redis, models: Callable[[], Iterable[str]]) -> None:
        self.client = client
        self.models = models

    def collect(self) -> Iterable[Metric]:
        """Read every model queue's length (all priority levels) now."""
        family = GaugeMetricFamily(
            "cq_queue_depth",
            "Messages waiting in the model's Redis queue.",
            labels=["model", "queue"],
        )
        try:
            for model in sorted(set(self.models())):
                depth = queue_depth(self.client, queue_name(model))
                family.add_metric([model, queue_name(model)], depth)
        except redis.RedisError as exc:
            log.warning("queue depth unavailable: %s", exc)
        yield family


class JobStatusCollector(Collector):
    """``cq_jobs_in_status{status}``: rows of the jobs table per status, read at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[Metric]:
        """Count the jobs per status now."""
        family = GaugeMetricFamily(
            "cq_jobs_in_status", "Jobs in the database, by status.", labels=["status"]
        )
        for status, count in sorted(self.counts().items()):
            family.add_metric([status], count)
        yield family


#: One row of a :class:`TableCollector`: its label values, and its values by gauge name.
Row = tuple[Sequence[str], Mapping[str, float]]


class TableCollector(Collector):
    """Gauges read at scrape time in one call that returns rows of label values and values:
    ``cq_backlog_queued_tokens{model}``, ``cq_tenant_served_tokens{model,tenant}``..."""

    def __init__(
        self,
        gauges: Mapping[str, str],
        labels: Sequence[str],
        rows: Callable[[], Iterable[Row]],
    ) -> None:
        """Args:
        gauges: each gauge's name (a key of the rows' values) and its help text.
        labels: the label names, in the order of each row's label values.
        rows: reads the rows now (the database, Redis); an error leaves the gauges empty.
        """
        self.gauges = gauges
        self.labels = list(labels)
        self.rows = rows

    def collect(self) -> Iterable[Metric]:
        """Read the rows now and yield one gauge family per name."""
        families = {
            name: GaugeMetricFamily(name, text, labels=self.labels)
            for name, text in self.gauges.items()
        }
        try:
            for labels, values in self.rows():
                for name, family in families.items():
                    family.add_metric(list(labels), float(values[name]))
        except Exception as exc:  # a scrape must answer, even with the database down
            log.warning("%s unavailable: %s", ", ".join(families), redact_url(str(exc)))
            return
        yield from families.values()

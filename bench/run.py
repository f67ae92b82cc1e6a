"""The benchmark run: baselines and the real pipeline, on one model, in one run.

Every ratio compares figures measured in the same run on the same machine, so a
shared, noisy machine moves both sides together.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import redis

from bench.direct import Direct
from bench.hardware import dtype_name, matmul_peak_gflops, memory_gbps, mfu, roofline_tokens_per_s
from bench.report import Phases
from bench.workloads import Item, mixed, shared_prefix, uniform
from completion_queue import (
    TINY_MODEL_NAME,
    EmbeddedRedis,
    Settings,
    WorkerProcess,
    create_app,
    events_key,
    rss_mb,
    stop_workers,
    worker_env,
)
from db import Job, JobStatus, upgrade
from engine.tiny import ensure_tiny_model
from producer import CompletionClient
from producer.stats import percentile

#: The JSON schema half of the structured-output workload's jobs carry.
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "record",
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "count": {"type": "integer"},
                "done": {"type": "boolean"},
            },
            "required": ["title", "count", "done"],
        },
    },
}

NOOP_TASK = "cq.bench.noop"
NOOP_QUEUE = "cq.bench.noop"
COUNTER_KEY = "cq:bench:noop:done"
#: The shared-prefix workload's workers compute a shared header once from this length on.
PREFIX_MIN_TOKENS: int = Settings.model_fields["prefix_min_tokens"].default


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the issue's defaults finish in under 3 minutes on 2 CPU cores."""

    jobs: int = 1024
    new_tokens: int = 32
    batch_size: int = 32
    model: str = TINY_MODEL_NAME
    device: str = "auto"
    dtype: str = "auto"
    workers: int = 1
    engine: Literal["static", "continuous"] = "static"
    batch_wait_ms: int = 20
    batch_lookahead: int = Settings.model_fields["batch_lookahead"].default
    mixed_jobs: int = 512
    naive_jobs: int = 48
    queue_jobs: int = 2000
    latency_jobs: int = 20
    schema_jobs: int = 256
    stream_jobs: int = 64
    #: Tokens of the header every job of the shared-prefix workload starts with (0: no run).
    shared_prefix_tokens: int = 0
    shared_prefix_jobs: int = 64


def _model_process_rss_mb(worker: WorkerProcess) -> float:
    """RSS of the worker's pool process, the one that holds the model."""
    return max((rss_mb(pid) for pid in worker.pool_pids()), default=float("nan"))


def _span_s(jobs: Sequence[Job], started: datetime) -> float:
    last = max(j.finished_at for j in jobs if j.finished_at is not None)
    return max((last - started).total_seconds(), 1e-9)


class _Cluster:
    """An embedded Redis, a fresh SQLite database and worker processes, for one run."""

    def __init__(self, config: BenchConfig, base: Path) -> None:
        self.config = config
        self.base = base
        self.redis = EmbeddedRedis(base / "redis", appendonly=False).start()
        self.database_url = f"sqlite:///{base / 'bench.db'}"
        upgrade(self.database_url)

    def settings(self, workers: int, **overrides: Any) -> Settings:
        threads = max(1, (os.cpu_count() or 1) // workers)
        return Settings(
            broker_url=self.redis.url,
            database_url=self.database_url,
            data_dir=self.base,
            model=self.config.model,
            device=self.config.device,
            dtype=self.config.dtype,
            engine=self.config.engine,
            batch_size=self.config.batch_size,
            batch_wait_ms=self.config.batch_wait_ms,
            batch_lookahead=self.config.batch_lookahead,
            torch_threads=threads if workers > 1 else 0,
            max_batch_requests=max(10_000, self.config.queue_jobs, self.config.jobs),
            **overrides,
        )

    def start_workers(self, count: int, **overrides: Any) -> list[WorkerProcess]:
        settings = self.settings(count, **overrides)
        workers = [
            WorkerProcess(worker_env(settings), self.base / f"worker-{count}-{i}.log").start()
            for i in range(count)
        ]
        for worker in workers:
            worker.wait_ready(timeout_s=300)
        return workers

    def stop(self) -> None:
        self.redis.stop()


def _pipeline(
    client: CompletionClient, items: Sequence[Item], *, with_schema: int = 0, sampled: bool = False
) -> tuple[int, float, float]:
    """Submit ``items`` through the client and wait; return tokens, seconds, submit seconds.

    With ``with_schema=k``, every k-th job carries a JSON schema (constrained output);
    ``sampled`` jobs leave out their temperature (0: greedy) and sample at the default.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    requests = [item.request() for item in items]
    if sampled:
        for request in requests:
            del request["temperature"]
    if with_schema:
        for request in requests[::with_schema]:
            request["response_format"] = SCHEMA_FORMAT
    jobs = client.submit_many(requests)
    submit_s = time.perf_counter() - t0
    done = client.wait(jobs, timeout=3600)
    failed = [j for j in done if j.status is not JobStatus.SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark jobs did not succeed: {failed[0].error}")
    return sum(j.completion_tokens or 0 for j in done), _span_s(done, started), submit_s


def _first_token_ms(client: CompletionClient, items: Sequence[Item]) -> list[float]:
    """Submit ``items`` at once as streamed jobs; return each one's time to first token, in ms.

    The first delta's stream entry id is the Redis server's time of that write
    (same host as the client here): the first token reached a reader then.
    """
    jobs = client.submit_many([{**item.request(), "stream": True} for item in items])
    done = client.wait(jobs, timeout=3600)
    broker = redis.Redis.from_url(client.settings.broker_url or "")
    try:
        firsts: list[Any] = [broker.xrange(events_key(job.id), count=1) for job in done]
    finally:
        broker.close()
    return [
        int(str(first[0][0], "ascii").split("-")[0]) - job.created_at.timestamp() * 1000
        for job, first in zip(done, firsts, strict=True)
        if first
    ]


def _celery_noop_rate(cluster: _Cluster, count: int) -> float:
    """Tasks per second of a bare Celery no-op on the same Redis and worker settings."""
    settings = cluster.settings(1)
    env = {**os.environ, **worker_env(settings)}
    log = (cluster.base / "noop-worker.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.noop",
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={NOOP_QUEUE}",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=INFO",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    counter = redis.Redis.from_url(settings.broker_url or "")
    try:
        deadline = time.monotonic() + 120
        while b"ready." not in (cluster.base / "noop-worker.log").read_bytes():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the Celery no-op worker did not start")
            time.sleep(0.1)
        counter.delete(COUNTER_KEY)
        app = create_app(settings)
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task(NOOP_TASK, queue=NOOP_QUEUE, producer=producer)
        while int(counter.get(COUNTER_KEY) or 0) < count:
            time.sleep(0.005)
        return count / (time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        counter.close()


def run_bench(config: BenchConfig, *, progress: Any = print) -> dict[str, Any]:
    """Run every measurement of ``cq bench`` and return the figures."""
    import torch

    progress = Phases(progress)

    base_settings = Settings(model=config.model)
    path = base_settings.model_path()
    if config.model == TINY_MODEL_NAME:
        ensure_tiny_model(path)
    direct = Direct(path, config.device, config.dtype)
    tokenizer = direct.tokenizer
    items = uniform(tokenizer, config.jobs, config.new_tokens)
    mixed_items = mixed(tokenizer, config.mixed_jobs)
    figures: dict[str, Any] = {
        "params": direct.params,
        "weight_bytes": direct.weight_bytes,
        "dtype": dtype_name(direct.dtype),
    }

    progress(
        f"direct generate ({figures['dtype']}): warm-up, raw (batched) and naive "
        "(one prompt per call)"
    )
    direct.run(items[: config.batch_size], config.batch_size)
    tokens, seconds = direct.run(items, config.batch_size)
    figures["raw_tokens_per_s"] = tokens / seconds
    tokens, seconds = direct.run(items[: config.naive_jobs], 1)
    figures["naive_tokens_per_s"] = tokens / seconds
    tokens, seconds = direct.run(mixed_items, config.batch_size)
    figures["mixed_raw_tokens_per_s"] = tokens / seconds
    direct.close()
    figures.update(_hardware(config, path, items, figures, progress))

    with tempfile.TemporaryDirectory(prefix="cq-bench-") as tmp:
        cluster = _Cluster(config, Path(tmp))
        try:
            workers = cluster.start_workers(1)
            with CompletionClient(settings=cluster.settings(1)) as client:
                progress(f"pipeline: {config.jobs} jobs x {config.new_tokens} tokens, 1 worker")
                tokens, seconds, _ = _pipeline(client, items)
                figures["pipeline_tokens_per_s"] = tokens / seconds
                figures["worker_rss_mb"] = _model_process_rss_mb(workers[0])
                progress(f"pipeline: mixed workload, {config.mixed_jobs} jobs")
                tokens, seconds, _ = _pipeline(client, mixed_items)
                figures["mixed_pipeline_tokens_per_s"] = tokens / seconds
                figures["worker_rss_after_mixed_mb"] = _model_process_rss_mb(workers[0])
                progress(f"queue: {config.queue_jobs} trivial jobs (max_new_tokens=1)")
                trivial = [Item(f"job {i}", 1) for i in range(config.queue_jobs)]
                _, seconds, submit_s = _pipeline(client, trivial)
                figures["queue_jobs_per_s"] = config.queue_jobs / seconds
                figures["submit_jobs_per_s"] = config.queue_jobs / submit_s
                progress(f"latency: {config.latency_jobs} jobs one at a time")
                latencies = []
                for item in items[: config.latency_jobs]:
                    job = client.wait(client.submit(**item.request()), timeout=600)
                    latencies.append((job.latency_s or 0) * 1000)
                figures["p50_latency_ms"] = percentile(latencies, 50)
                figures["p95_latency_ms"] = percentile(latencies, 95)
                progress(f"time to first token: {config.stream_jobs} streamed jobs at once")
                first_token_ms = _first_token_ms(client, items[: config.stream_jobs])
                figures["p50_ttft_ms"] = percentile(first_token_ms, 50)
                figures["p95_ttft_ms"] = percentile(first_token_ms, 95)
                progress(f"structured output: {config.schema_jobs} jobs, then half constrained")
                plain = items[: config.schema_jobs]
                tokens, seconds, _ = _pipeline(client, plain)
                figures["schema_none_tokens_per_s"] = tokens / seconds
                tokens, seconds, _ = _pipeline(client, plain, with_schema=2)
                figures["schema_half_tokens_per_s"] = tokens / seconds
                progress(f"sampled: {config.schema_jobs} jobs at the API's default temperature, 1")
                tokens, seconds, _ = _pipeline(client, plain, sampled=True)
                figures["sampled_tokens_per_s"] = tokens / seconds
            stop_workers(workers)
            progress(f"celery no-op baseline: {config.queue_jobs} tasks")
            figures["celery_noop_jobs_per_s"] = _celery_noop_rate(cluster, config.queue_jobs)
            if config.shared_prefix_tokens:
                figures.update(_shared_prefix(cluster, tokenizer, progress))
            if config.workers > 1:
                progress(f"pipeline: {config.jobs} jobs, {config.workers} workers")
                workers = cluster.start_workers(config.workers)
                with CompletionClient(settings=cluster.settings(config.workers)) as client:
                    tokens, seconds, _ = _pipeline(client, items)
                stop_workers(workers)
                figures["workers_pipeline_tokens_per_s"] = tokens / seconds
                figures["workers_over_one"] = tokens / seconds / figures["pipeline_tokens_per_s"]
        finally:
            cluster.stop()

    figures["pipeline_mfu"] = mfu(
        figures["params"], figures["pipeline_tokens_per_s"], figures["matmul_peak_gflops"]
    )
    figures["decode_roofline_tokens_per_s"] = roofline_tokens_per_s(
        figures["weight_bytes"], config.batch_size, figures["memory_gbps"]
    )
    for name, (numerator, denominator) in RATIOS.items():
        figures[name] = figures[numerator] / figures[denominator]
    settings = asdict(config)
    figures.update(
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        torch=torch.__version__,
        # ``dtype`` is the worker's resolved dtype; the option asked for (auto...) is this one.
        dtype_option=settings.pop("dtype"),
        **settings,
    )
    figures.update(progress.seconds())
    return figures


def _shared_prefix(cluster: _Cluster, tokenizer: Any, progress: Any) -> dict[str, float]:
    """The shared-prefix workload through one worker with prefix reuse at its default, then off."""
    config = cluster.config
    items = shared_prefix(
        tokenizer, config.shared_prefix_jobs, config.shared_prefix_tokens, config.new_tokens
    )
    found: dict[str, float] = {}
    for key, min_tokens in (("prefix", PREFIX_MIN_TOKENS), ("prefix_off", 0)):
        progress(
            f"shared prefix: {len(items)} jobs, a {config.shared_prefix_tokens}-token header, "
            f"CQ_PREFIX_MIN_TOKENS={min_tokens}"
        )
        workers = cluster.start_workers(1, prefix_min_tokens=min_tokens)
        with CompletionClient(settings=cluster.settings(1)) as client:
            tokens, seconds, _ = _pipeline(client, items)
        stop_workers(workers)
        found[f"{key}_pipeline_tokens_per_s"] = tokens / seconds
    found["prefix_reuse_speedup"] = (
        found["prefix_pipeline_tokens_per_s"] / found["prefix_off_pipeline_tokens_per_s"]
    )
    return found


def _hardware(
    config: BenchConfig, path: str, items: Sequence[Item], figures: dict[str, Any], progress: Any
) -> dict[str, Any]:
    """Raw ``generate`` in float32 (worker's threads, same items), the matmul peak, the memory.

    A worker that runs float32 already has its raw figure: that one is reused.
    """
    from engine.devices import model_threads, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    found: dict[str, Any] = {"fp32_raw_tokens_per_s": figures["raw_tokens_per_s"]}
    if figures["dtype"] != "float32":
        progress("direct generate in float32: warm-up, raw (batched)")
        direct = Direct(path, config.device, "float32")
        direct.run(items[: config.batch_size], config.batch_size)
        tokens, seconds = direct.run(items, config.batch_size)
        found["fp32_raw_tokens_per_s"] = tokens / seconds
        direct.close()
    threads = f", {model_threads()} threads" if device.type == "cpu" else ""
    progress(f"matmul peak: {figures['dtype']} on {device}{threads}")
    found["matmul_peak_gflops"] = matmul_peak_gflops(
        device, resolve_dtype(config.dtype, device), threads=model_threads()
    )
    progress(f"memory bandwidth: a 256 MiB copy on {device}{threads}")
    found["memory_gbps"] = memory_gbps(device, threads=model_threads())
    return found


#: Each ratio of the report: its numerator and denominator figures.
RATIOS = {
    "pipeline_over_raw": ("pipeline_tokens_per_s", "raw_tokens_per_s"),
    "pipeline_over_naive": ("pipeline_tokens_per_s", "naive_tokens_per_s"),
    "mixed_pipeline_over_raw": ("mixed_pipeline_tokens_per_s", "mixed_raw_tokens_per_s"),
    "queue_over_celery": ("queue_jobs_per_s", "celery_noop_jobs_per_s"),
    "schema_half_over_none": ("schema_half_tokens_per_s", "schema_none_tokens_per_s"),
    "sampled_over_greedy": ("sampled_tokens_per_s", "schema_none_tokens_per_s"),
    "pipeline_over_fp32_raw": ("pipeline_tokens_per_s", "fp32_raw_tokens_per_s"),
    "pipeline_over_roofline": ("pipeline_tokens_per_s", "decode_roofline_tokens_per_s"),
}

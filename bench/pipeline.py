"""The real pipeline for one run, driven from outside: its cluster, the jobs sent through it,
and the bare Celery no-op task it is measured against."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.workloads import Item
from completion_queue import (
    EmbeddedRedis,
    Settings,
    WorkerProcess,
    create_app,
    events_key,
    rss_mb,
    worker_env,
)
from db import Job, JobStatus, upgrade
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

#: One backlog job in this many streams its deltas (see :func:`first_tokens_behind_backlog`).
SENTINEL_EVERY = 32

NOOP_TASK = "cq.bench.noop"
NOOP_QUEUE = "cq.bench.noop"
COUNTER_KEY = "cq:bench:noop:done"


class Cluster:
    """An embedded Redis, a fresh SQLite database and worker processes, for one run.

    ``worker_settings`` are the :class:`Settings` fields every worker of the run shares.
    """

    def __init__(self, base: Path, **worker_settings: Any) -> None:
        self.base = base
        self.worker_settings = worker_settings
        self.redis = EmbeddedRedis(base / "redis", appendonly=False).start()
        self.database_url = f"sqlite:///{base / 'bench.db'}"
        upgrade(self.database_url)

    def settings(self, workers: int, **overrides: Any) -> Settings:
        """The settings of each of ``workers`` workers (and of their clients)."""
        threads = max(1, (os.cpu_count() or 1) // workers)
        return Settings(
            broker_url=self.redis.url,
            database_url=self.database_url,
            data_dir=self.base,
            torch_threads=threads if workers > 1 else 0,
            **self.worker_settings,
            **overrides,
        )

    def start_workers(self, count: int, **overrides: Any) -> list[WorkerProcess]:
        """Start ``count`` workers and wait until each is ready."""
        settings = self.settings(count, **overrides)
        workers = [
            WorkerProcess(worker_env(settings), self.base / f"worker-{count}-{i}.log").start()
            for i in range(count)
        ]
        for worker in workers:
            worker.wait_ready(timeout_s=300)
        return workers

    def stop(self) -> None:
        """Stop the embedded Redis."""
        self.redis.stop()


def model_process_rss_mb(worker: WorkerProcess) -> float:
    """RSS of the worker's pool process, the one that holds the model."""
    return max((rss_mb(pid) for pid in worker.pool_pids()), default=float("nan"))


def _span_s(jobs: Sequence[Job], started: datetime) -> float:
    last = max(j.finished_at for j in jobs if j.finished_at is not None)
    return max((last - started).total_seconds(), 1e-9)


def run_jobs(
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


def first_token_ms(client: CompletionClient, items: Sequence[Item]) -> list[float]:
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


@dataclass(frozen=True)
class BehindBacklog:
    """What :func:`first_tokens_behind_backlog` measured, in ms."""

    #: Each probe's time to first token, from its submit.
    ttft_ms: list[float]
    #: The probes' time per generated token while the backlog ran (one engine step).
    step_ms: float
    #: The share of the backlog's jobs that finished after the last probe's first token.
    backlog_running: float


def decoding(broker: redis.Redis, sentinels: Sequence[Job], tokens: int) -> None:
    """Wait until one of ``sentinels`` (streamed jobs) has generated ``tokens`` tokens, or
    all of them ended (shorter: they met an end token)."""
    since = {events_key(job.id): "0" for job in sentinels}
    ended: set[str] = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(ended) < len(since):
        read: Any = broker.xread(since, block=1000)  # type: ignore[arg-type]
        for key, entries in read or []:
            for entry_id, fields in entries:
                since[str(key, "ascii")] = entry_id
                if fields.get(b"type") == b"end":
                    ended.add(str(key, "ascii"))
                elif int(fields.get(b"tokens", 0)) >= tokens:
                    return
    if len(ended) == len(since):
        return
    raise RuntimeError(f"no backlog job generated {tokens} tokens within 10 minutes")


def first_tokens_behind_backlog(
    client: CompletionClient, backlog: Sequence[Item], probes: Sequence[Item]
) -> BehindBacklog:
    """Submit ``backlog`` as batch lines; once it generates, ``probes`` as streamed jobs.

    One backlog job in every :data:`SENTINEL_EVERY` is streamed (not all of it: that
    would cost the writer), and the probes go in once one of those has generated an
    eighth of its tokens: the backlog decodes by then. At its first token an engine that
    runs it all at once (vLLM) is still prefilling the rest of it, in steps several times
    as long (GPT-2-small: about 1 s a step for two steps, then 0.25 s). The probes' own
    deltas measure a step: the time between two deltas of a probe ÷ the tokens between
    them (the writer may merge steps), their median.
    """
    requests = [item.request() for item in backlog]
    for request in requests[::SENTINEL_EVERY]:
        request["stream"] = True
    queued = client.submit_many(requests, lane="batch")
    broker = redis.Redis.from_url(client.settings.broker_url or "")
    try:
        decoding(broker, queued[::SENTINEL_EVERY], max(1, backlog[0].max_new_tokens // 8))
        jobs = client.submit_many([{**item.request(), "stream": True} for item in probes])
        done = client.wait(jobs, timeout=3600)
        streams: list[Any] = [broker.xrange(events_key(job.id)) for job in done]
    finally:
        broker.close()
    behind = client.wait(queued, timeout=3600)
    failed = [j for j in [*done, *behind] if j.status is not JobStatus.SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark jobs did not succeed: {failed[0].error}")
    ttft: list[float] = []
    per_token: list[float] = []
    last_first = 0.0
    for job, entries in zip(done, streams, strict=True):
        marks = [
            (int(str(entry_id, "ascii").split("-")[0]), int(fields[b"tokens"]))
            for entry_id, fields in entries
            if fields.get(b"type") == b"delta"
        ]
        if not marks:
            continue
        ttft.append(marks[0][0] - job.created_at.timestamp() * 1000)
        last_first = max(last_first, marks[0][0] / 1000)
        per_token += [
            (at - before) / (tokens - had)
            for (before, had), (at, tokens) in itertools.pairwise(marks)
            if tokens > had
        ]
    running = sum(1 for j in behind if j.finished_at and j.finished_at.timestamp() > last_first)
    return BehindBacklog(
        ttft_ms=ttft,
        step_ms=percentile(per_token, 50),
        backlog_running=running / max(1, len(behind)),
    )


def celery_noop_rate(cluster: Cluster, count: int) -> float:
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

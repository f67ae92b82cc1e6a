"""``cq demo``: the whole pipeline on embedded defaults, with a progress bar and a report."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from cli.render import job_table, show, wait_with_progress
from completion_queue import (
    TINY_MODEL_NAME,
    Settings,
    Stopped,
    WorkerProcess,
    embedded_broker,
    redact_url,
    stop_on_signals,
    worker_env,
)
from db import Job, JobStatus
from engine.tiny import ensure_tiny_model, is_current
from producer import CompletionClient
from producer.stats import percentile

PROMPTS = [
    "The queue takes a job and",
    "Once upon a time",
    "The weather today is",
    "Python is a programming language that",
    "Redis is an in-memory data store",
    "A transaction commits",
    "Question: what is the capital of France? Answer:",
    "Dear team, thank you for",
    "def add(a, b):",
    "The river runs past",
    "She opened the door and",
    "Numbers: one two three",
    "Beautiful is better than",
    "Errors should never pass",
    "In 1969 people",
    "The worker takes a batch",
]


def summarize(jobs: Sequence[Job]) -> str:
    """Return the summary line: jobs/s, tokens/s, p50 and p95 latency."""
    finished = [j for j in jobs if j.finished_at is not None]
    if not finished:
        return "no job finished"
    last = max(j.finished_at for j in finished if j.finished_at is not None)
    span = last - min(j.created_at for j in jobs)
    seconds = max(span.total_seconds(), 1e-9)
    tokens = sum(j.completion_tokens or 0 for j in finished)
    latencies = [j.latency_s * 1000 for j in finished if j.latency_s is not None]
    ok = sum(j.status is JobStatus.SUCCEEDED for j in jobs)
    return (
        f"{ok}/{len(jobs)} succeeded in {seconds:.2f}s: {len(finished) / seconds:.1f} jobs/s, "
        f"{tokens / seconds:.0f} tokens/s, latency p50 {percentile(latencies, 50):.0f} ms, "
        f"p95 {percentile(latencies, 95):.0f} ms"
    )


def demo_requests(n_jobs: int, new_tokens: int) -> list[dict[str, Any]]:
    """Return the demo's requests: greedy, seeded sampling and stop sequences, mixed."""
    requests: list[dict[str, Any]] = []
    for i in range(n_jobs):
        request: dict[str, Any] = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_new_tokens": new_tokens,
        }
        if i % 3 == 0:
            request["temperature"] = 0.0
        else:
            request.update(temperature=0.8, top_p=0.95, seed=i)
        if i % 4 == 3:
            request["stop"] = ["\n"]
        requests.append(request)
    return requests


def describe_model(console: Console, settings: Settings) -> None:
    """Say which model the demo runs (building the tiny one first if needed)."""
    path = settings.model_path()
    if settings.model == TINY_MODEL_NAME and not is_current(path):
        with console.status("building the tiny model (once, about 20 s on 2 cores)"):
            ensure_tiny_model(path)
    if not is_current(path):
        console.print(f"model: {settings.model}", markup=False, highlight=False)
        return
    size_mb = sum(f.stat().st_size for f in Path(path).iterdir()) / 1e6
    where = "" if path == settings.model else f" ({path})"
    console.print(f"model: {settings.model}{where}", markup=False, highlight=False)
    for line in (  # each under 80 columns: a pipe or a CI log does not wrap them
        f"  built-in tiny model, {size_mb:.0f} MB, trained for seconds on local text: poor words",
        "  for a real one: CQ_MODEL=gpt2 cq demo (Hugging Face hub) or a model dir",
    ):
        console.print(line, markup=False, highlight=False)


def run_demo(settings: Settings, *, n_jobs: int, new_tokens: int, timeout: float) -> int:
    """Run the demo; return 0 only if every job succeeded (128 + N if stopped by signal N).

    SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop the worker and the embedded broker first.
    """
    console = Console()
    try:
        with stop_on_signals():
            return _run_demo(
                console, settings, n_jobs=n_jobs, new_tokens=new_tokens, timeout=timeout
            )
    except Stopped as stop:
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            what = "worker" if settings.broker_url else "worker and embedded broker"
            console.print(f"stopped on {stop.signal.name}: {what} shut down")
        return 128 + stop.signal


def _run_demo(
    console: Console, settings: Settings, *, n_jobs: int, new_tokens: int, timeout: float
) -> int:
    describe_model(console, settings)
    with embedded_broker(settings) as live:
        console.print(f"broker: {redact_url(live.broker_url)}")
        console.print(f"database: {redact_url(live.resolved_database_url())}")
        log_path = live.data_dir / "demo-worker.log"
        with WorkerProcess(worker_env(live), log_path) as worker:
            with console.status("starting worker (loading the model once)"):
                worker.wait_ready()
            console.print(f"worker {worker.pid} ready (log: {log_path})")
            with CompletionClient(settings=live) as client:
                jobs = client.submit_many(demo_requests(n_jobs, new_tokens))
                console.print(f"submitted {len(jobs)} jobs")
                done = wait_with_progress(client, [j.id for j in jobs], timeout=timeout)
    show(job_table(done))
    console.print(summarize(done))
    return 0 if all(j.status is JobStatus.SUCCEEDED for j in done) else 1

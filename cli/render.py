"""How the CLI shows things: tables of jobs, workers and cluster stats, and progress bars."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from completion_queue import queue_name
from db import Job
from producer import CompletionClient
from producer.backlog import ModelBacklog, TenantLoad
from producer.stats import ClusterStats, WorkerInfo


def show(renderable: RenderableType) -> None:
    """Print a table at the width it needs, even past the terminal's or piped (where rich
    assumes 80 columns): names and ids are printed whole, to be pasted."""
    console = Console()
    needed = console.measure(renderable, options=console.options.update_width(100_000)).maximum
    Console(width=max(console.width, needed)).print(renderable)


def job_table(jobs: Sequence[Job]) -> Table:
    """Return a table of jobs: id, status, model, tokens, latency, start of the completion."""
    table = Table(show_lines=False)
    for column, width in (("job id", 8), ("status", 9), ("model", 5)):
        table.add_column(column, no_wrap=True, min_width=width)
    for column, width in (("tokens", 6), ("latency ms", 10)):
        table.add_column(column, no_wrap=True, min_width=width, justify="right")
    table.add_column("completion", no_wrap=True, overflow="ellipsis", max_width=30)
    for job in jobs:
        latency = f"{job.latency_s * 1000:.0f}" if job.latency_s is not None else "-"
        text = job.text if job.text is not None else (job.error or {}).get("message", "")
        table.add_row(
            str(job.id)[:8],
            job.status.value,
            job.model,
            str(job.completion_tokens or 0),
            latency,
            repr(text[:40]),
        )
    return table


def wait_with_progress(
    client: CompletionClient, ids: Sequence[uuid.UUID], *, timeout: float
) -> list[Job]:
    """Wait for ``ids`` while a progress bar shows how many are finished."""
    columns = (TextColumn("jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("jobs", total=len(ids))

        def update(finished: int, total: int) -> None:
            progress.update(task, completed=finished)

        return client.wait(list(ids), timeout=timeout, on_progress=update)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def workers_table(workers: Sequence[WorkerInfo]) -> Table:
    """Return a table of live workers: model, engine, device, threads, batch settings, jobs done."""
    table = Table(title=f"{len(workers)} live worker(s)")
    table.add_column("worker", no_wrap=True)
    table.add_column("model", no_wrap=True)
    columns = ("engine", "device", "threads", "batch", "wait ms", "jobs done", "failed", "up s")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for w in workers:
        table.add_row(
            w.hostname,
            w.model or "?",
            w.engine or "?",
            w.device or "?",
            str(w.threads or "?"),
            str(w.batch_size or "?"),
            str(w.batch_wait_ms if w.batch_wait_ms is not None else "?"),
            str(w.jobs_done),
            str(w.jobs_failed),
            str(w.uptime_s or "?"),
        )
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
        str(stats.finished),
        f"{stats.jobs_per_s:.2f}",
        f"{stats.tokens_per_s:.1f}",
        " / ".join(_ms(v) for v in stats.latency_s.values()),
        _ms(stats.queue_wait_s["p50"]),
    )
    queues = Table(title="queues")
    queues.add_column("model", no_wrap=True)
    queues.add_column("queue", no_wrap=True)
    queues.add_column("waiting", justify="right")
    for model, depth in stats.queues.items():
        queues.add_row(model, queue_name(model), str(depth))
    return Group(
        jobs,
        recent,
        queues,
        tenants_table(stats.tenants, window_s=stats.window_s),
        workers_table(stats.workers),
    )


def tenants_table(loads: Sequence[TenantLoad], *, window_s: float) -> Table:
    """Return a table of each tenant's load per model: queued jobs and estimated tokens, and
    the tokens it was served in the last ``window_s`` seconds."""
    table = Table(title="tenants")
    table.add_column("model", no_wrap=True)
    table.add_column("tenant", no_wrap=True)
    for column in ("queued", "queued tokens", f"served tokens ({window_s:.0f} s)"):
        table.add_column(column, justify="right", no_wrap=True)
    for load in loads:
        table.add_row(
            load.model,
            load.tenant or "-",
            str(load.queued_jobs),
            str(load.queued_tokens),
            str(load.served_tokens),
        )
    return table


def backlog_table(backlogs: dict[str, ModelBacklog]) -> Table:
    """Return a table of each model's backlog signal (what `cq backlog` prints)."""
    table = Table(title="backlog")
    table.add_column("model", no_wrap=True)
    columns = ("queued", "queued tokens", "running", "workers", "tokens/s/worker", "desired")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for model, found in backlogs.items():
        rate = f"{found.tokens_per_s_per_worker:.0f}" + ("" if found.measured else " (assumed)")
        table.add_row(
            model,
            str(found.queued_jobs),
            str(found.queued_tokens),
            str(found.running_jobs),
            str(found.workers),
            rate,
            str(found.desired_workers),
        )
    return table

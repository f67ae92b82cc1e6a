"""The table ``cq bench`` prints: each figure, and each ratio against its target."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.run import TARGETS

ROWS = [
    ("raw_tokens_per_s", "direct batched generate (ceiling)"),
    ("naive_tokens_per_s", "one generate per prompt"),
    ("pipeline_tokens_per_s", "client → Redis → worker → SQL"),
    ("pipeline_over_raw", "pipeline / raw"),
    ("pipeline_over_naive", "pipeline / naive"),
    ("fp32_raw_tokens_per_s", "direct batched generate in float32, worker's threads"),
    ("pipeline_over_fp32_raw", "pipeline / raw in float32"),
    ("matmul_peak_gflops", "square matmul GFLOP/s, worker's dtype and threads"),
    ("pipeline_mfu", "2 x params x pipeline tokens/s ÷ matmul peak"),
    ("memory_gbps", "memory GB/s (a large copy), worker's threads"),
    ("decode_roofline_tokens_per_s", "batch x bandwidth ÷ weight bytes: steps bound by memory"),
    ("pipeline_over_roofline", "pipeline / that roofline"),
    ("mixed_raw_tokens_per_s", "mixed: direct, batches in arrival order"),
    ("mixed_pipeline_tokens_per_s", "mixed: pipeline"),
    ("mixed_pipeline_over_raw", "mixed: pipeline / raw"),
    ("queue_jobs_per_s", "trivial jobs through the whole path"),
    ("celery_noop_jobs_per_s", "bare Celery no-op tasks"),
    ("queue_over_celery", "queue / Celery"),
    ("submit_jobs_per_s", "submit_many into Redis and SQL"),
    ("p50_latency_ms", "latency p50, light load"),
    ("p95_latency_ms", "latency p95, light load"),
    ("p50_ttft_ms", "time to first token p50, streamed jobs at once"),
    ("p95_ttft_ms", "time to first token p95, streamed jobs at once"),
    ("schema_none_tokens_per_s", "structured: no row constrained"),
    ("schema_half_tokens_per_s", "structured: half the rows with a JSON schema"),
    ("schema_half_over_none", "structured: half / none"),
    ("sampled_tokens_per_s", "the structured run's jobs, sampled at temperature 1"),
    ("sampled_over_greedy", "sampled / greedy (structured: none)"),
    ("prefix_pipeline_tokens_per_s", "shared prefix: pipeline, computed once per group"),
    ("prefix_off_pipeline_tokens_per_s", "shared prefix: pipeline, reuse off"),
    ("prefix_reuse_speedup", "shared prefix: reuse / off"),
    ("worker_rss_mb", "worker RSS after the uniform run"),
    ("worker_rss_after_mixed_mb", "worker RSS after the mixed run"),
    ("workers_pipeline_tokens_per_s", "pipeline with --workers N"),
    ("workers_over_one", "N workers / one worker"),
]


def print_report(figures: dict[str, Any]) -> None:
    """Print the figures as a table, with each target and whether it is met."""
    table = Table(title="cq bench")
    for column in ("figure", "value", "target", "what"):
        table.add_column(column)
    for key, what in ROWS:
        if key not in figures:
            continue
        value = figures[key]
        target = TARGETS.get(key)
        mark = ""
        if target is not None:
            mark = f"≥ {target:g} " + ("[green]met[/]" if value >= target else "[red]missed[/]")
        table.add_row(key, f"{value:,.2f}", mark, what)
    console = Console()
    console.print(table)
    settings = ", ".join(
        f"{k}={figures[k]}"
        for k in ("machine", "gpu", "torch", "model", "params", "device", "dtype", "engine",
                  "batch_size", "jobs", "new_tokens", "mixed_jobs", "workers")
    )  # fmt: skip
    console.print(settings)

"""What ``cq bench`` shows: its progress lines with their times, then each figure and ratio."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

#: The figures with a target, and the least each should reach (issues 3 and 16).
TARGETS = {
    "pipeline_over_raw": 0.95,
    "mixed_pipeline_over_raw": 1.3,
    "pipeline_over_naive": 5.0,
    "queue_over_celery": 0.70,
    "submit_jobs_per_s": 3000.0,
    "prefix_reuse_speedup": 5.0,
}

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
    ("idle_p50_ttft_ms", "time to first token p50, 8 short jobs on the idle worker"),
    ("backlog_p50_ttft_ms", "the same behind a running batch backlog (--backlog-jobs)"),
    ("backlog_step_ms", "an engine step then (the short jobs' time per token)"),
    ("backlog_ttft_steps", "what the backlog adds to time to first token, in steps"),
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


#: The vLLM run's targets (issue 33, the GPT-2-small shape), beside those above.
VLLM_TARGETS = {
    "pipeline_over_vllm_offline": 0.9,
    "mixed_pipeline_over_vllm_offline": 0.9,
}

#: The vLLM run's ceilings: figures that should stay at or below (issue 33).
VLLM_CEILINGS = {"backlog_ttft_steps": 3.0}

#: Figures that are differences, so zero or below is a plain result (not a failed phase).
SIGNED = {"backlog_ttft_steps"}

#: The vLLM run's own rows (``cq bench --engine vllm``), shown after those above.
VLLM_ROWS = [
    ("vllm_offline_tokens_per_s", "vLLM's own offline LLM.generate, same items, dtype, engine"),
    ("pipeline_over_vllm_offline", "pipeline / vLLM offline"),
    ("mixed_vllm_offline_tokens_per_s", "mixed: vLLM offline"),
    ("mixed_pipeline_over_vllm_offline", "mixed: pipeline / vLLM offline"),
    ("prefix_vllm_offline_tokens_per_s", "shared prefix: vLLM offline, prefix caching on"),
    ("prefix_pipeline_over_vllm_offline", "shared prefix: pipeline / vLLM offline"),
    ("prefix_off_vllm_offline_tokens_per_s", "shared prefix: vLLM offline, each request salted"),
    ("prefix_off_pipeline_over_vllm_offline", "shared prefix, reuse off: pipeline / vLLM offline"),
    ("vllm_offline_prefix_reuse_speedup", "shared prefix: vLLM offline, reuse / off"),
]


class Phases:
    """Time each step of the run, from one progress line to the next, to size job counts by.

    Each line is shown with the time since the run started; :meth:`seconds` gives every
    step's seconds (``phase_s`` in the figures) and the whole run's (``bench_s``).
    """

    def __init__(self, show: Any) -> None:
        self.show = show
        self.started = self.mark = time.perf_counter()
        self.current: str | None = None
        self.steps: dict[str, float] = {}

    def __call__(self, line: str) -> None:
        self._close()
        minutes, seconds = divmod(int(time.perf_counter() - self.started), 60)
        self.show(f"[{minutes}:{seconds:02d}] {line}")
        self.current = line

    def _close(self) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.steps[self.current] = round(now - self.mark, 1)
        self.mark = now

    def seconds(self) -> dict[str, Any]:
        self._close()
        self.current = None
        return {"phase_s": self.steps, "bench_s": round(self.mark - self.started, 1)}


def print_report(figures: dict[str, Any]) -> None:
    """Print the figures as a table, with each target and whether it is met."""
    table = Table(title="cq bench")
    for column in ("figure", "value", "target", "what"):
        table.add_column(column)
    targets = {**TARGETS, **VLLM_TARGETS}
    for key, what in [*ROWS, *VLLM_ROWS]:
        if key not in figures:
            continue
        value = figures[key]
        target, ceiling = targets.get(key), VLLM_CEILINGS.get(key)
        mark = ""
        if target is not None:
            mark = f"≥ {target:g} " + ("[green]met[/]" if value >= target else "[red]missed[/]")
        elif ceiling is not None and figures.get("engine") == "vllm":
            mark = f"≤ {ceiling:g} " + ("[green]met[/]" if value <= ceiling else "[red]missed[/]")
        table.add_row(key, f"{value:,.2f}", mark, what)
    console = Console()
    console.print(table)
    for phase, why in figures.get("skipped", {}).items():
        console.print(f"skipped: {phase}: {why}")
    settings = ", ".join(
        f"{k}={figures[k]}"
        for k in (
            "machine",
            "gpu",
            "torch",
            "model",
            "params",
            "device",
            "dtype",
            "engine",
            "batch_size",
            "jobs",
            "new_tokens",
            "mixed_jobs",
            "workers",
            "vllm",
            "vllm_offline_threads",
        )
        if k in figures
    )
    console.print(settings)
    if "bench_s" in figures:
        minutes, seconds = divmod(round(figures["bench_s"]), 60)
        console.print(f"the whole run: {minutes} min {seconds:02d} s (each step's: --json phase_s)")

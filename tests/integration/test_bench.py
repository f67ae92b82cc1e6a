"""`cq bench` runs end to end and reports every figure (small sizes; figures are not judged)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from bench.report import ROWS
from bench.run import TARGETS, BenchConfig, run_bench
from workers.model import resolve_device, resolve_dtype


def test_bench_reports_every_figure(tiny_model: Path) -> None:
    config = BenchConfig(
        model=str(tiny_model), jobs=64, new_tokens=8, batch_size=16, mixed_jobs=32,
        naive_jobs=4, queue_jobs=100, latency_jobs=3, workers=2, schema_jobs=16, stream_jobs=8,
    )  # fmt: skip
    figures = run_bench(config, progress=lambda _line: None)
    for key, _what in ROWS:
        assert key in figures, key
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
        assert figures[key] > 0, key
    assert set(TARGETS) <= set(figures)
    assert figures["jobs"] == 64 and figures["batch_size"] == 16
    # The figures against the hardware: the model's size, the worker's resolved dtype
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert figures["params"] == params
    worker_dtype = str(resolve_dtype("auto", resolve_device("auto"))).removeprefix("torch.")
    assert figures["dtype"] == worker_dtype and figures["dtype_option"] == "auto"
    assert figures["pipeline_mfu"] == pytest.approx(
        2 * params * figures["pipeline_tokens_per_s"] / (figures["matmul_peak_gflops"] * 1e9)
    )
    assert figures["pipeline_over_fp32_raw"] == pytest.approx(
        figures["pipeline_tokens_per_s"] / figures["fp32_raw_tokens_per_s"]
    )
    if worker_dtype == "float32":  # raw already ran in float32: its figure is reused
        assert figures["fp32_raw_tokens_per_s"] == figures["raw_tokens_per_s"]

"""`cq bench` runs end to end and reports every figure (small sizes; figures are not judged)."""

from __future__ import annotations

import math
from pathlib import Path

from bench.report import ROWS
from bench.run import TARGETS, BenchConfig, run_bench


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

"""`cq bench --engine vllm` runs end to end at a tiny size and reports vLLM's figures.

The figures are not judged here (a few jobs on a shared machine), only that each is
there, positive and consistent: every ratio is the quotient of its two figures. The
run starts its own vLLM workers and offline engine; it shares no worker with the
other tests here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import ROWS, SIGNED, VLLM_ROWS, VLLM_TARGETS
from bench.run import DIRECT_SKIPPED, VLLM_RATIOS
from engine.devices import model_threads

pytestmark = pytest.mark.timeout(600)


def test_cq_bench_with_the_vllm_engine_reports_vllm_offline_figures(
    tiny_model: Path, tmp_path: Path
) -> None:
    # When `cq bench --engine vllm` runs a few jobs of each workload, the shared prefix too
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "cli",
        "bench",
        "--engine",
        "vllm",
        "--model",
        str(tiny_model),
        "--jobs",
        "32",
        "--new-tokens",
        "8",
        "--batch-size",
        "8",
        "--mixed-jobs",
        "16",
        "--queue-jobs",
        "50",
        "--latency-jobs",
        "2",
        "--stream-jobs",
        "4",
        "--schema-jobs",
        "8",
        "--shared-prefix-tokens",
        "80",
        "--shared-prefix-jobs",
        "8",
        "--backlog-jobs",
        "16",
        "--backlog-new-tokens",
        "24",
        "--json",
        str(out),
    ]
    env = {**os.environ, "CQ_DATA_DIR": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())

    # Then every vLLM figure is there and positive, and each ratio is its figures' quotient
    for key, _what in [*ROWS, *VLLM_ROWS]:
        if key not in figures:
            continue  # the direct generate baselines: skipped, said below
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
        assert key in SIGNED or figures[key] > 0, key
    assert figures["backlog_step_ms"] > 0 and "backlog_ttft_steps" in figures
    for name, (numerator, denominator) in VLLM_RATIOS.items():
        if numerator in figures and denominator in figures:
            assert figures[name] == pytest.approx(figures[numerator] / figures[denominator]), name
    assert set(VLLM_TARGETS) <= set(figures)
    assert figures["prefix_reuse_speedup"] == pytest.approx(
        figures["prefix_pipeline_tokens_per_s"] / figures["prefix_off_pipeline_tokens_per_s"]
    )
    # And the offline engine ran in the workers' dtype, on their threads (all cores but one)
    assert figures["engine"] == "vllm" and figures["vllm"]
    assert figures["vllm_offline_dtype"] == figures["dtype"]
    assert figures["vllm_offline_threads"] == model_threads()
    # And time to first token under a backlog is reported, as on the static engine
    assert figures["p50_ttft_ms"] > 0 and figures["p95_ttft_ms"] >= figures["p50_ttft_ms"]
    # And the direct generate baselines are not faked: absent, with the reason given
    assert "raw_tokens_per_s" not in figures and "pipeline_over_raw" not in figures
    assert figures["skipped"] == {"direct generate": DIRECT_SKIPPED}
    assert f"skipped: direct generate: {DIRECT_SKIPPED}"[:60] in " ".join(done.stdout.split())
    # And the offline run is a phase of its own, counted in the whole run's seconds
    assert any(phase.startswith("vLLM offline") for phase in figures["phase_s"])
    assert sum(figures["phase_s"].values()) == pytest.approx(figures["bench_s"], abs=1.0)

"""`cq bench` runs end to end and reports every figure (small sizes; figures are not judged)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.report import ROWS, SIGNED, TARGETS
from bench.run import PREFIX_MIN_TOKENS, BenchConfig, run_bench
from bench.workloads import shared_prefix
from benchmarks import decode
from completion_queue import TINY_MODEL_NAME
from engine.devices import resolve_device, resolve_dtype
from engine.prefix import shared_prefix_len


def test_bench_reports_every_figure(tiny_model: Path, user_data_dir: Path) -> None:
    # Given the default model, tiny-gpt2, built in the user's CQ_DATA_DIR (as `cq bench`
    # finds it; the run's own workers get a data dir of their own, where it is not)
    config = BenchConfig(
        model=TINY_MODEL_NAME,
        jobs=64,
        new_tokens=8,
        batch_size=16,
        mixed_jobs=32,
        naive_jobs=4,
        queue_jobs=100,
        latency_jobs=3,
        workers=2,
        schema_jobs=16,
        stream_jobs=8,
        shared_prefix_tokens=80,
        shared_prefix_jobs=8,
        backlog_jobs=32,
        backlog_new_tokens=24,
    )
    lines: list[str] = []
    figures = run_bench(config, progress=lines.append)
    for key, _what in ROWS:
        assert key in figures, key
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
        assert key in SIGNED or figures[key] > 0, key
    # The backlog's figures: what it adds to time to first token is in its steps
    assert figures["backlog_ttft_steps"] == pytest.approx(
        (figures["backlog_p50_ttft_ms"] - figures["idle_p50_ttft_ms"]) / figures["backlog_step_ms"]
    )
    assert 0 <= figures["backlog_running"] <= 1
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
    # The memory roofline: batch x bandwidth over the weights' bytes in the worker's dtype
    weight_bytes = params * torch.empty((), dtype=getattr(torch, worker_dtype)).element_size()
    assert figures["weight_bytes"] == weight_bytes
    assert figures["decode_roofline_tokens_per_s"] == pytest.approx(
        16 * figures["memory_gbps"] * 1e9 / weight_bytes
    )
    assert figures["pipeline_over_roofline"] == pytest.approx(
        figures["pipeline_tokens_per_s"] / figures["decode_roofline_tokens_per_s"]
    )
    assert figures["pipeline_over_fp32_raw"] == pytest.approx(
        figures["pipeline_tokens_per_s"] / figures["fp32_raw_tokens_per_s"]
    )
    if worker_dtype == "float32":  # raw already ran in float32: its figure is reused
        assert figures["fp32_raw_tokens_per_s"] == figures["raw_tokens_per_s"]
    # Each step's seconds, to size the job counts by: one per progress line, shown with the
    # time since the start; together they are the whole run
    assert len(figures["phase_s"]) == len(lines) >= 10
    assert all(re.match(r"\[\d+:\d\d\] \S", line) for line in lines), lines
    assert [line.split("] ", 1)[1] for line in lines] == list(figures["phase_s"])
    assert sum(figures["phase_s"].values()) == pytest.approx(figures["bench_s"], abs=1.0)


def test_shared_prefix_workload_shares_its_header_in_tokens(tiny_model: Path) -> None:
    # Given the tiny model's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # When the shared-prefix workload is made with a 128-token header
    items = shared_prefix(tokenizer, 16, 128, 8)
    # Then the prompts differ, yet share the header (and "Question ") in tokens: reuse applies
    prompts = [tokenizer(item.prompt, add_special_tokens=False)["input_ids"] for item in items]
    assert len({tuple(p) for p in prompts}) == 16
    assert 126 <= shared_prefix_len(prompts, PREFIX_MIN_TOKENS) <= 140


def test_the_decode_bench_compares_variants_against_the_default(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # When `python -m benchmarks.decode` runs the default and the worker's way (packed, growing cache)
    decode.main(
        [
            "--model",
            str(tiny_model),
            "--batch",
            "4",
            "--prompt",
            "8",
            "--new",
            "4",
            "--variants",
            "worker",
            "--no-reshape",
            "--repeats",
            "1",
        ]
    )
    # Then its table has a row for each, the default's ratio 1.00 against itself
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.split()[:1] in (["default"], ["worker"]) and len(line.split()) == 11
    }
    assert set(rows) == {"default", "worker"}
    assert rows["default"][1] == rows["worker"][1] == "4"  # the batch
    assert rows["default"][5] == "1.00"
    assert float(rows["worker"][3]) > 0


def test_the_decode_bench_times_the_three_shared_prefix_paths(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # When it times the worker's runtime on a group sharing a 96-token header
    decode.main(
        [
            "--model",
            str(tiny_model),
            "--dtype",
            "float32",
            "--shared-prefix",
            "96",
            "--batch",
            "4",
            "--new",
            "4",
        ]
    )
    # Then it reports reuse off, the copied prefix and cascade attention, each against the first
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith("x")]
    assert [line.split(" s ")[0].rsplit(None, 1)[0].strip() for line in lines] == [
        "reuse off",
        "prefix once, copied",
        "prefix once, cascade",
    ]
    assert lines[0].endswith("1.00x")

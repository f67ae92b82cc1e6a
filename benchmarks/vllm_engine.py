"""The vLLM engine without the queue: which part of ``pipeline_over_vllm_offline`` is the
engine's and which the queue's (issue 33).

In one run, on the items of ``cq bench``'s uniform workload: vLLM's own offline
``LLM.generate`` (a child process, built as ``cq bench --engine vllm`` builds it), then the
worker's :class:`engine.vllm.VllmEngine` in this process, built as the worker builds it
(its rows per step, KV cache, threads and dtype) and fed as the worker feeds it: the items
split into ``--calls`` calls of ``--jobs`` / ``--calls`` rows, each from a thread of its own
(a worker's flushes), every row followed (a follower that keeps each row's tokens, as the
worker's progress watch does). The engine runs twice on the same items: rows reported
every few tokens (the worker's way, at the default ``CQ_PROGRESS_INTERVAL_MS``), then at
every step (as a streamed job's). No Redis, database or Celery: what the engine gives
below offline is the engine's cost; what ``cq bench --engine vllm``'s pipeline gives below
this is the queue's. Run from vLLM's venv::

    .venv-vllm/bin/python -m benchmarks.vllm_engine --json /tmp/vllm-engine.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.vllm_offline import measure_offline
from bench.workloads import Item, uniform
from completion_queue import TINY_MODEL_NAME, Settings, engine_rows
from engine.tiny import ensure_tiny_model
from engine.types import GenerationRequest, GenerationResult


class Rows:
    """One call's rows as the worker's progress watch keeps them: each row's tokens so far."""

    def __init__(self, requests: Sequence[GenerationRequest]) -> None:
        self.rows: list[list[int]] = [[] for request in requests for _ in range(request.n)]
        #: How many times the engine reported a row's tokens.
        self.reports = 0

    def set(self, index: int, tokens: list[int]) -> None:
        self.reports += 1
        self.rows[index] = tokens

    def finish(self, index: int) -> None:
        pass

    def tokens(self, index: int) -> list[int]:
        return list(self.rows[index])

    def step(self, last: Sequence[int]) -> list[int]:
        return []

    def tick(self) -> None:
        pass

    def to_stop(self) -> list[int]:
        return []

    def cancelled_at(self, index: int) -> int | None:
        return None


class Follower:
    """Follows every call of a run (the engine's :class:`engine.protocol.Follower`)."""

    def __init__(self) -> None:
        self.calls: list[Rows] = []

    def follow(self, requests: Sequence[GenerationRequest]) -> Rows:
        rows = Rows(requests)
        self.calls.append(rows)
        return rows


def run_engine(engine: Any, requests: list[GenerationRequest], calls: int) -> dict[str, float]:
    """Tokens per second of ``requests`` split into ``calls`` concurrent calls, and the
    reports per row."""
    per = -(-len(requests) // calls)
    parts = [requests[i : i + per] for i in range(0, len(requests), per)]
    follower = Follower()
    results: list[list[GenerationResult | Exception]] = [[] for _ in parts]

    def call(index: int) -> None:
        results[index] = engine.generate(parts[index], watch=follower)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(parts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    tokens = 0
    for part in results:
        for result in part:
            if not isinstance(result, GenerationResult):
                raise RuntimeError(f"a row failed: {result!r}")
            tokens += sum(choice.completion_tokens for choice in result.choices)
    reports = sum(rows.reports for rows in follower.calls)
    return {"tokens_per_s": tokens / seconds, "reports_per_row": reports / len(requests)}


def measure(model: str, jobs: int, new_tokens: int, calls: int) -> dict[str, Any]:
    """The offline run, then the engine's two, on the same items."""
    import torch

    from engine.devices import resolve_dtype
    from engine.vllm import VllmEngine

    settings = Settings(model=model)
    path = str(settings.model_path())
    if model == TINY_MODEL_NAME:
        ensure_tiny_model(Path(path))
    from transformers import AutoTokenizer

    items: list[Item] = uniform(AutoTokenizer.from_pretrained(path), jobs, new_tokens)
    dtype = str(resolve_dtype(settings.dtype, torch.device("cpu"))).removeprefix("torch.")
    rows = engine_rows(settings)
    with tempfile.TemporaryDirectory(prefix="cq-vllm-engine-") as base:
        offline = measure_offline(
            path,
            dtype=dtype,
            max_rows=rows,
            kv_rows=settings.batch_size,
            warm_up=settings.batch_size,
            workloads={"uniform": items},
            threads=settings.torch_threads,
            base=Path(base),
        )
    result = offline["results"]["uniform"]
    figures: dict[str, Any] = {
        "jobs": jobs,
        "new_tokens": new_tokens,
        "calls": calls,
        "rows_per_step": rows,
        "dtype": dtype,
        "vllm_offline_tokens_per_s": result["tokens"] / result["seconds"],
    }
    engine = VllmEngine(
        path,
        dtype=dtype,
        max_rows=rows,
        kv_rows=settings.batch_size,
        threads=settings.torch_threads,
        progress_s=settings.progress_interval_ms / 1000,
    )
    try:
        engine.warm_up()
        encoded = engine.encode([item.prompt for item in items])
        requests = [
            GenerationRequest(
                key=str(i), prompt_ids=tuple(ids), max_new_tokens=item.max_new_tokens, temperature=0
            )
            for i, (item, ids) in enumerate(zip(items, encoded, strict=True))
        ]
        run_engine(engine, requests[: settings.batch_size], 1)  # warm at these shapes
        for name, stream in (("engine", False), ("engine_every_step", True)):
            found = run_engine(engine, [replace(r, stream=stream) for r in requests], calls)
            figures[f"{name}_tokens_per_s"] = found["tokens_per_s"]
            figures[f"{name}_reports_per_row"] = found["reports_per_row"]
            figures[f"{name}_over_vllm_offline"] = (
                found["tokens_per_s"] / figures["vllm_offline_tokens_per_s"]
            )
    finally:
        engine.close()
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.vllm_engine``: print the figures (and write them as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=TINY_MODEL_NAME)
    parser.add_argument("--jobs", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=16, help="concurrent calls (flushes)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = measure(args.model, args.jobs, args.new_tokens, args.calls)
    for name, value in figures.items():
        print(f"{name:38} {value:,.3f}" if isinstance(value, float) else f"{name:38} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

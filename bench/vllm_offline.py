"""vLLM's own offline ``LLM.generate`` on the bench's items: the vLLM pipeline's baseline.

``cq bench --engine vllm`` divides its pipeline's tokens per second by these, measured in
the same run. They run in a child process (``python -m bench.vllm_offline IN OUT``),
started and ended before the cluster's workers: vLLM's engine keeps its memory and threads
until its process exits, and no later phase may share the cores with it.

The child builds its engine as the worker's :class:`engine.vllm.VllmEngine` does, so the
ratio is the queue's own cost: the engine core in-process, the dtype the run resolved, the
same rows per step, KV cache and prefix caching, the same torch threads (set before the
engine is built, by :func:`engine.devices.set_model_threads`: all cores but one on a CPU),
each item mapped to ``SamplingParams`` by the worker's own :func:`engine.vllm.sampling_kwargs`
and its tokens counted as a job's are (cut at the first end token). Prefix reuse off is the
shared-prefix items each with a ``cache_salt`` of its own: no request reuses another's
blocks, in the same engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.workloads import Item

#: Seconds the child may take: vLLM's start (20 to 60 s here) and every workload.
OFFLINE_TIMEOUT_S = 1800


def measure_offline(
    model: str,
    *,
    dtype: str,
    max_rows: int,
    kv_rows: int,
    warm_up: int,
    workloads: Mapping[str, Sequence[Item]],
    salted: Sequence[str] = (),
    threads: int = 0,
    base: Path,
) -> dict[str, Any]:
    """Run ``workloads`` through vLLM's offline ``LLM.generate`` in a child process.

    Args:
        model: the model's path, as the workers load it.
        dtype: the resolved dtype (``bfloat16``...), the workers' too.
        max_rows: rows vLLM runs per step (``max_num_seqs``), as the worker's engine.
        kv_rows: rows of full context the KV cache holds, as the worker's engine.
        warm_up: items of the first workload run once, untimed, before the others.
        workloads: items by name, each name timed alone after a warm-up on the first.
        salted: the names whose requests each get a cache salt of their own (reuse off).
        threads: torch's CPU threads, as the worker's ``CQ_TORCH_THREADS`` (0: all cores
            but one on a CPU).
        base: where the child's input, output and log go.

    Returns:
        ``tokens`` and ``seconds`` per workload, and the child's ``threads``, ``dtype``,
        ``vllm`` version and ``load_s``.
    """
    spec = {
        "model": model,
        "dtype": dtype,
        "max_rows": max_rows,
        "kv_rows": kv_rows,
        "warm_up": warm_up,
        "workloads": {
            name: [[item.prompt, item.max_new_tokens] for item in items]
            for name, items in workloads.items()
        },
        "salted": list(salted),
        "threads": threads,
    }
    spec_path, out_path, log_path = (
        base / "vllm-offline-in.json",
        base / "vllm-offline-out.json",
        base / "vllm-offline.log",
    )
    spec_path.write_text(json.dumps(spec))
    with log_path.open("wb") as log:
        code = subprocess.run(
            [sys.executable, "-m", "bench.vllm_offline", str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=OFFLINE_TIMEOUT_S,
            check=False,
        ).returncode
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"vLLM's offline run exited with {code}: " + " | ".join(tail))
    found: dict[str, Any] = json.loads(out_path.read_text())
    return found


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work: build the engine as the worker does, warm it up, time each workload."""
    # The worker's model process runs vLLM's engine core in-process; so does this one.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from vllm import LLM, SamplingParams
    from vllm.config import SchedulerConfig

    from engine.devices import set_model_threads
    from engine.types import GenerationRequest
    from engine.vllm import kv_cache_bytes, sampling_kwargs

    started = time.perf_counter()
    model, dtype = spec["model"], spec["dtype"]
    # Before the engine is built, which forbids it after (as in VllmEngine).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_model_threads(spec["threads"], device)
    tokenizer: Any = AutoTokenizer.from_pretrained(model)
    config = AutoConfig.from_pretrained(model)
    context = int(
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or tokenizer.model_max_length
    )
    # The end tokens and the KV cache's size as VllmEngine takes them.
    try:
        listed = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        listed = None
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    eos = tokenizer.eos_token_id
    eos_ids = list(dict.fromkeys(([eos] if eos is not None else []) + [int(i) for i in listed]))
    pad = tokenizer.pad_token_id
    ends = {*eos_ids, pad if pad is not None else (eos if eos is not None else 0)}
    itemsize = getattr(torch, dtype).itemsize
    kv_bytes = kv_cache_bytes(
        config, itemsize, context=context, max_rows=spec["max_rows"], kv_rows=spec["kv_rows"]
    )
    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=context,
        max_num_seqs=spec["max_rows"],
        # LLM's own default on CPU is 4,096 tokens a step; the worker's LLMEngine gets this.
        max_num_batched_tokens=SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS,
        kv_cache_memory_bytes=kv_bytes,
        enable_prefix_caching=True,
        seed=0,
        disable_log_stats=True,
        scheduling_policy="priority",
    )
    load_s = time.perf_counter() - started

    def run(items: list[list[Any]], salt: str | None) -> tuple[int, float]:
        prompts: list[Any] = []
        params = []
        for i, (prompt, max_new) in enumerate(items):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": ids})
            if salt is not None:
                prompts[-1]["cache_salt"] = f"{salt}-{i}"
            request = GenerationRequest(
                key=str(i), prompt_ids=tuple(ids), max_new_tokens=max_new, temperature=0.0
            )
            params.append(SamplingParams(**sampling_kwargs(request, 0, stop_token_ids=eos_ids)))
        # Each workload starts from an empty prefix cache, as a fresh worker's would.
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = 0
        for (_, max_new), output in zip(items, outputs, strict=True):
            ids = list(output.outputs[0].token_ids)[:max_new]
            tokens += next((i for i, token in enumerate(ids) if token in ends), len(ids))
        return tokens, seconds

    workloads: dict[str, list[list[Any]]] = spec["workloads"]
    first = next(iter(workloads.values()))
    run(first[: spec["warm_up"]], None)
    results = {
        name: run(items, name if name in spec["salted"] else None)
        for name, items in workloads.items()
    }
    return {
        "results": {name: {"tokens": t, "seconds": s} for name, (t, s) in results.items()},
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "vllm": vllm.__version__,
        "load_s": load_s,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.vllm_offline IN OUT``: read the spec from IN, write the figures to OUT."""
    spec_path, out_path = argv if argv is not None else sys.argv[1:]
    figures = _run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

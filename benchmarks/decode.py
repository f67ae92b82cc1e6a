"""Decode-step experiments (issue 16): ``generate`` variants timed against the default, one run.

Each variant loads its own copy of the model (a compiled forward stays with its
model) and runs the worker's kind of call: a left-padded batch, greedy,
``use_cache=True``, on the worker's torch threads. Ratios are against
``default`` measured in the same process; ``same`` is the share of rows whose
tokens equal the default's.

    .venv/bin/python -m benchmarks.decode --model /tmp/gpt2-small --batch 32 --prompt 16,128 \
        --variants default,packed,static,compile,freeze

``--sampling`` times the worker's runtime instead, on ``--batch`` rows: greedy,
then sampled (temperature 1, top_p 0.9, top_k 50). ``--shared-prefix 512``
times it on one group of ``--batch`` rows sharing a 512-token header: reuse
off, the prefix computed once and copied to every row, and that with cascade
attention (the worker's path).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from transformers import AutoTokenizer

from bench.hardware import dtype_name, matmul_peak_gflops, mfu
from bench.workloads import prompt_of_length
from benchmarks.variants import VARIANTS, Variant, attention, generation_config, inductor, load
from engine.devices import model_threads, resolve_dtype
from engine.kvcache import growing_cache

T = TypeVar("T")


@dataclass(slots=True)
class Row:
    """One variant's figures at one shape."""

    variant: str
    batch: int
    prompt: int
    best_s: float
    first_s: float
    same: float
    new_shape_s: float | None = None
    graphs: int | None = None


def prompts(tokenizer: Any, rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``rows`` prompts of about ``length`` tokens (as the worker pads)."""
    texts = [prompt_of_length(tokenizer, length, seed + 37 * i) for i in range(rows)]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Run ``call`` once; return its seconds and output."""
    started = time.perf_counter()
    out = call()
    return time.perf_counter() - started, out


def unique_graphs() -> int:
    """Graphs dynamo compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(
    model: Any,
    tokenizer: Any,
    name: str,
    variant: Variant,
    *,
    batch: int,
    prompt: int,
    new_tokens: int,
    repeats: int,
    reference: torch.Tensor | None,
    reshape: bool,
) -> tuple[Row, torch.Tensor]:
    """Time ``variant`` at one shape: first call, best of ``repeats``, then a new shape."""
    config = generation_config(variant, new_tokens, tokenizer.pad_token_id)
    inputs = prompts(tokenizer, batch, prompt)

    def call(kw: dict[str, torch.Tensor] = inputs) -> torch.Tensor:
        cache = growing_cache(model) if variant.growing else None
        with torch.inference_mode(), inductor(variant), attention(variant):
            return model.generate(  # type: ignore[no-any-return]
                **kw, cache=cache, generation_config=config
            )

    graphs = unique_graphs()
    first_s, out = timed(call)
    best_s = min(timed(call)[0] for _ in range(repeats))
    same = 1.0
    if reference is not None and out.shape == reference.shape:
        same = float((out == reference).all(dim=1).float().mean())
    elif reference is not None:
        same = 0.0
    row = Row(name, batch, inputs["input_ids"].shape[1], best_s, first_s, same)
    if reshape:
        # The worker's batches vary in rows and prompt length: what does a new shape cost?
        other = prompts(tokenizer, max(1, batch - 3), prompt + 5, seed=1)
        new_first, _ = timed(lambda: call(other))
        new_warm, _ = timed(lambda: call(other))
        row.new_shape_s = new_first - new_warm
    row.graphs = unique_graphs() - graphs
    return row, out


def profile_step(model: Any, tokenizer: Any, batch: int, prompt: int, new_tokens: int) -> None:
    """Print where one ``generate`` call's time goes (default variant), by aten op."""
    from torch.profiler import ProfilerActivity, profile

    config = generation_config(VARIANTS["default"], new_tokens, tokenizer.pad_token_id)
    inputs = prompts(tokenizer, batch, prompt)
    with torch.inference_mode():
        model.generate(**inputs, generation_config=config)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(**inputs, generation_config=config)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def print_table(rows: Sequence[Row], params: int, peak: float, new_tokens: int) -> None:
    """The comparison: tokens/s, ms per generated token step, ratio to default, MFU."""
    head = (
        f"{'variant':<15}{'batch':>6}{'prompt':>7}{'tok/s':>9}{'ms/step':>9}{'ratio':>7}"
        f"{'mfu':>7}{'first_s':>9}{'newshape_s':>11}{'graphs':>7}{'same':>6}"
    )
    print(head)
    print("-" * len(head))
    base: dict[tuple[int, int], float] = {}
    for row in rows:
        rate = row.batch * new_tokens / row.best_s
        if row.variant == "default":
            base[(row.batch, row.prompt)] = rate
        ratio = rate / base.get((row.batch, row.prompt), float("nan"))
        reshape = f"{row.new_shape_s:.2f}" if row.new_shape_s is not None else "-"
        print(
            f"{row.variant:<15}{row.batch:>6}{row.prompt:>7}{rate:>9.0f}"
            f"{row.best_s / new_tokens * 1000:>9.1f}{ratio:>7.2f}{mfu(params, rate, peak):>7.3f}"
            f"{row.first_s:>9.2f}{reshape:>11}{row.graphs if row.graphs is not None else '-':>7}"
            f"{row.same:>6.2f}"
        )


def ints(text: str) -> list[int]:
    """Parse ``32,64`` into ``[32, 64]``."""
    return [int(part) for part in text.split(",") if part]


def shared_prefix_paths(path: str, dtype: str, prefix: int, batch: int, new: int) -> None:
    """Time the worker's runtime on one group sharing a ``prefix``-token header, three ways.

    Reuse off (every row's whole prompt computed), the prefix computed once with
    its KV cache copied to every row, and that with attention reading the prefix
    once per step (what the worker does): seconds per group, best of two.
    """
    import engine.static
    from engine import GenerationRequest

    runtime = engine.static.StaticEngine(path, device="cpu", dtype=dtype, prefix_min_tokens=64)
    header = runtime.encode([prompt_of_length(runtime.tokenizer, prefix, 7)])[0][:prefix]
    requests = [
        GenerationRequest(
            key=str(i),
            prompt_ids=tuple(header + runtime.encode([f" Question {i}: why?"])[0]),
            max_new_tokens=new,
            temperature=0.0,
        )
        for i in range(batch)
    ]
    runtime.generate(requests[:2])
    paths = [
        ("reuse off", 0, True),
        ("prefix once, copied", 64, False),
        ("prefix once, cascade", 64, True),
    ]
    print(f"{path} {dtype}: {batch} rows, a {prefix}-token header, {new} new tokens")
    base = 0.0
    for name, min_tokens, cascade in paths:
        runtime.prefix_min_tokens, runtime.cascade_attention = min_tokens, cascade
        seconds = min(timed(lambda: runtime.generate(requests))[0] for _ in range(2))
        base = base or seconds
        print(
            f"  {name:<22}{seconds:>7.2f} s  {batch * new / seconds:>6.0f} tok/s  "
            f"{base / seconds:>5.2f}x",
            flush=True,
        )


def sampling_paths(path: str, dtype: str, batch: int, prompt: int, new: int) -> None:
    """Time the worker's runtime on ``batch`` rows, greedy then sampled three ways.

    Sampled at the API's defaults (temperature 1), with top_p 0.9 and with top_k
    50: seconds per call, best of two, and tokens/s against greedy's.
    """
    import engine.static
    from engine import GenerationRequest

    runtime = engine.static.StaticEngine(path, device="cpu", dtype=dtype)
    ids = [
        runtime.encode([prompt_of_length(runtime.tokenizer, prompt, 37 * i)])[0]
        for i in range(batch)
    ]
    ways: list[tuple[str, dict[str, Any]]] = [
        ("greedy", {"temperature": 0.0}),
        ("temperature 1", {}),
        ("top_p 0.9", {"top_p": 0.9}),
        ("top_k 50", {"top_k": 50}),
    ]
    print(f"{path} {dtype}: {batch} rows, {prompt}-token prompts, {new} new tokens")
    base = 0.0
    for name, params in ways:
        requests = [
            GenerationRequest(
                key=str(i), prompt_ids=tuple(row), max_new_tokens=new, seed=i, **params
            )
            for i, row in enumerate(ids)
        ]
        runtime.generate(requests[:2])
        best, results = min(
            (timed(partial(runtime.generate, requests)) for _ in range(2)), key=lambda t: t[0]
        )
        tokens = sum(
            c.completion_tokens for r in results if not isinstance(r, Exception) for c in r.choices
        )
        base = base or tokens / best
        print(
            f"  {name:<15}{best:>7.2f} s  {tokens / best:>6.0f} tok/s  "
            f"{tokens / best / base:>5.2f}x",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the variants at each batch and prompt length and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decode",
        description=__doc__,
        epilog="variants: " + "; ".join(f"{k}: {v.help}" for k, v in VARIANTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="/tmp/gpt2-small", help="local model directory or HF id")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: what a worker's CQ_DTYPE=auto picks on this CPU",
    )
    parser.add_argument("--batch", type=ints, default=[32], help="rows per call, e.g. 32,128")
    parser.add_argument("--prompt", type=ints, default=[16], help="prompt tokens, e.g. 16,128")
    parser.add_argument("--new", type=int, default=32, help="new tokens per row")
    parser.add_argument(
        "--variants",
        default="default,eager,static,compile,linear",
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the worker's)")
    parser.add_argument("--no-reshape", action="store_true", help="skip the new-shape call")
    parser.add_argument("--profile", action="store_true", help="profile the default variant first")
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="TOKENS",
        help="instead: the runtime on a group sharing a header",
    )
    parser.add_argument(
        "--sampling", action="store_true", help="instead: the runtime greedy, then sampled"
    )
    args = parser.parse_args(argv)
    if args.dtype == "auto":  # bfloat16 where it is native, else float32 (80x slower emulated)
        args.dtype = dtype_name(resolve_dtype("auto", torch.device("cpu")))
    if args.sampling:
        torch.set_num_threads(args.threads or model_threads())
        sampling_paths(args.model, args.dtype, args.batch[0], args.prompt[0], args.new)
        return
    if args.shared_prefix:
        torch.set_num_threads(args.threads or model_threads())
        shared_prefix_paths(args.model, args.dtype, args.shared_prefix, args.batch[0], args.new)
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if "default" in names:  # the baseline runs first so the others can compare with it
        names.remove("default")
    names.insert(0, "default")
    torch.set_num_threads(args.threads or model_threads())
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peak = matmul_peak_gflops(torch.device("cpu"), dtype, threads=torch.get_num_threads())
    rows: list[Row] = []
    references: dict[tuple[int, int], torch.Tensor] = {}
    params = 0
    print(
        f"model {args.model}  dtype {args.dtype}  threads {torch.get_num_threads()}  "
        f"matmul peak {peak:.0f} GFLOP/s  new tokens {args.new}"
    )
    for name in names:
        variant = VARIANTS[name]
        model = load(args.model, dtype, variant)
        params = int(sum(p.numel() for p in model.parameters()))
        if name == "default":
            print(f"default attn_implementation: {model.config._attn_implementation}")
            if args.profile:
                profile_step(model, tokenizer, args.batch[0], args.prompt[0], args.new)
        for batch in args.batch:
            for prompt in args.prompt:
                reference = references.get((batch, prompt))
                try:
                    row, out = measure(
                        model,
                        tokenizer,
                        name,
                        variant,
                        batch=batch,
                        prompt=prompt,
                        new_tokens=args.new,
                        repeats=args.repeats,
                        reference=reference,
                        reshape=not args.no_reshape,
                    )
                except RuntimeError as exc:  # a variant that breaks is a finding, not the end
                    print(f"  {name} batch {batch} prompt {prompt}: FAILED {str(exc)[-300:]}")
                    continue
                if name == "default":
                    references[(batch, prompt)] = out
                rows.append(row)
                print(
                    f"  {name} batch {batch} prompt {row.prompt}: {row.best_s:.2f}s "
                    f"(first {row.first_s:.2f}s)",
                    flush=True,
                )
        del model
        gc.collect()
        torch._dynamo.reset()
    print()
    print_table(rows, params, peak, args.new)


if __name__ == "__main__":
    main()

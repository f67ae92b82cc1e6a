"""The hardware's own ceiling: a square matmul's rate in the worker's dtype and threads.

``pipeline_mfu`` compares the pipeline with it: a decoding step costs about
2 x parameters FLOPs per token (one multiply-add per weight), so
2 x params x tokens/s ÷ the matmul's FLOP/s is the share of the machine's
usable peak that generation reaches.

A decoding step at batch B also reads every weight once for B tokens, so it
cannot outrun the memory: ``decode_roofline_tokens_per_s`` is B x the memory's
bandwidth (:func:`memory_gbps`, a large copy on the same threads) ÷ the
weights' bytes. Where that is below what the matmul peak allows (one CPU core
at batch 32), the step is bound by memory, and ``pipeline_over_roofline`` says
how near the pipeline comes to that bound. Weights small enough to stay in the
CPU's caches (the tiny model) are read faster than this, and can beat it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: The matmul's side: big enough to reach a CPU's peak (2048) or a GPU's (8192).
CPU_MATMUL_N = 2048
CUDA_MATMUL_N = 8192
#: The copied buffer: far larger than any CPU cache.
COPY_BYTES = 256 * 2**20


def dtype_name(dtype: Any) -> str:
    """Return a torch dtype's short name: ``float32``, ``bfloat16``..."""
    return str(dtype).removeprefix("torch.")


def matmul_peak_gflops(device: Any, dtype: Any, *, threads: int, repeats: int = 5) -> float:
    """Return the best GFLOP/s (2 n^3 per product) of ``repeats`` n x n matmuls.

    On CPU it runs on ``threads`` torch threads; on CUDA, n is larger.
    """
    import torch

    n = CUDA_MATMUL_N if device.type == "cuda" else CPU_MATMUL_N
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=device).to(dtype)
    b = torch.randn(n, n, generator=generator, device=device).to(dtype)
    with torch.inference_mode():
        best = _best_seconds(device, threads, repeats, lambda: torch.mm(a, b))
    return 2 * n**3 / best / 1e9


def memory_gbps(device: Any, *, threads: int, repeats: int = 5) -> float:
    """Return the best GB/s (bytes read + written) of ``repeats`` copies of a 256 MiB buffer.

    On CPU on ``threads`` torch threads.
    """
    import torch

    source = torch.ones(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    best = _best_seconds(device, threads, repeats, lambda: target.copy_(source))
    return 2 * COPY_BYTES / best / 1e9


def _best_seconds(device: Any, threads: int, repeats: int, call: Callable[[], object]) -> float:
    """Return the shortest of ``repeats`` timed ``call()``s, after one to warm up.

    On CPU they run on ``threads`` torch threads (the caller's count is restored
    after); on CUDA each call is timed to its end.
    """
    import torch

    cuda = device.type == "cuda"
    before = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(threads)
    try:
        best = float("inf")
        for _ in range(repeats + 1):  # the first one warms up (and touches every page)
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return best


def roofline_tokens_per_s(weight_bytes: int, batch_size: int, gbps: float) -> float:
    """Return the tokens/s of steps of ``batch_size`` rows that each only read the weights."""
    return batch_size * gbps * 1e9 / weight_bytes


def mfu(params: int, tokens_per_s: float, peak_gflops: float) -> float:
    """Return the share of ``peak_gflops`` that 2 x ``params`` FLOPs a token reach."""
    return 2 * params * tokens_per_s / (peak_gflops * 1e9)

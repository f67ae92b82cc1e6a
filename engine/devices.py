"""Where and in what precision a model runs: its device, its dtype, its torch threads.

``CQ_DTYPE=auto`` is half precision where the hardware computes faster in it. On
CUDA that follows from the GPU. On a CPU the flags are not enough: a CPU can list
AVX512-BF16 and still multiply bf16 at half float32's speed, so where the flags
allow bf16, :func:`cpu_bf16_speedup` times it against float32 once per process.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

from completion_queue import ConfigError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device must be auto, cpu or cuda:N, got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by the ids ``CUDA_VISIBLE_DEVICES`` gives them (all of
    them when it is unset); empty without CUDA."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    named = [part for part in named if part]
    return named[:count] if named else [str(i) for i in range(count)]


def model_threads() -> int:
    """Torch CPU threads for a model process: all cores but one.

    The other core is left to the worker's main process, which receives and acks
    messages meanwhile: OpenMP threads that wait for a busy core stall.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def set_model_threads(threads: int, device: torch.device) -> int:
    """Give this process's torch ``threads`` CPU threads (0: :func:`model_threads` on a CPU).

    On a GPU with ``threads`` 0 torch keeps its own default. Either engine calls this
    before it loads the model: vLLM's CPU worker forbids ``torch.set_num_threads`` once
    its engine is built. Threads started later (vLLM's step thread) take this count too.

    Returns:
        The count torch reports now.
    """
    if threads or device.type == "cpu":
        torch.set_num_threads(threads or model_threads())
    return torch.get_num_threads()


#: CPU flags of instructions that compute in bfloat16: x86 AVX512-BF16 and AMX-BF16, Arm BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """Return this CPU's feature flags, empty where they cannot be read.

    From ``torch.cpu.get_capabilities()``, torch's public reader (cpuinfo, any OS;
    torch 2.13 has it); on a torch without it, from the ``flags`` (x86) or
    ``Features`` (Arm) lines of ``cpuinfo`` (Linux).
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return frozenset(name for name, value in capabilities().items() if value is True)
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            named = [line.partition(":") for line in lines]
    except OSError:
        return frozenset()
    keys = ("flags", "Features")  # x86, Arm
    return frozenset(f for key, _, v in named if key.strip() in keys for f in v.split())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (see :data:`NATIVE_BF16_FLAGS`).

    Elsewhere torch still runs bfloat16, converting each value to float32 and back:
    slower than float32. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not the
    test: it is private, and says yes on any AVX-512 CPU, where bfloat16 is emulated.
    """
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags())


#: ``auto`` runs a CPU in bfloat16 only where its products are at least this much faster
#: than float32's (AMX: 5-7x; a Xeon whose hypervisor hides AMX but shows AVX512-BF16: 0.5x).
BF16_MIN_SPEEDUP = 1.3


@functools.cache
def cpu_bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """How many times faster a ``size``² matmul runs in bfloat16 than in float32 here.

    Measured once per process, on the current torch threads (about 0.2 s on one core),
    best of ``repeats`` after a first call that packs and compiles the kernels. The
    flags are not enough: a CPU can list AVX512-BF16 and still multiply bf16 at half
    float32's speed (seen on a 2-core Xeon VM without AMX, where bf16 ``generate`` ran
    0.8-0.9x float32's).
    """
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(size, size, generator=generator) for _ in range(2))

    def best_s(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            x @ y
            timings.append(time.perf_counter() - started)
        return min(timings)

    return best_s(torch.float32) / max(best_s(torch.bfloat16), 1e-9)


def cpu_runs_bf16_faster() -> bool:
    """Whether ``auto`` picks bfloat16 on this CPU: bf16 instructions, and measured faster."""
    if not cpu_has_native_bf16():
        return False
    speedup = cpu_bf16_speedup()
    faster = speedup >= BF16_MIN_SPEEDUP
    log.info(
        "bfloat16 products run %.2fx float32's on this CPU: dtype auto is %s",
        speedup,
        "bfloat16" if faster else "float32",
    )
    return faster


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Return the dtype; ``auto`` is half precision where the hardware computes faster in it.

    On CUDA bf16 (fp16 on GPUs without bf16); on a CPU with bf16 instructions (AVX512-BF16,
    AMX, Arm BF16) whose bf16 products measure at least :data:`BF16_MIN_SPEEDUP` times
    float32's, bf16; on other CPUs float32.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_runs_bf16_faster() else torch.float32
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ConfigError(f"dtype must be one of auto, {', '.join(names)}, got {dtype!r}")
    return names[dtype]

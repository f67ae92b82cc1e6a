"""The vLLM engine's fixtures: one worker with CQ_ENGINE=vllm per module, and vLLM's own offline LLM.

These tests run on `make install-vllm`'s venv (`make test-vllm`); `make test` does not
collect them. Where vllm is not installed, or its CPU kernels cannot load on the CPU at
hand, every test here skips, saying why: CI never fails for the CPU's sake.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from completion_queue import EmbeddedRedis, Settings, WorkerProcess, worker_env
from producer.client import CompletionClient
from tests.conftest import new_database

#: Loads vLLM's compiled CPU kernels (AVX512-BF16, AVX512 or AVX2 builds) as an engine does.
PROBE = """
from vllm.platforms import current_platform
current_platform.import_kernels()
import torch
print(current_platform.device_name, torch.__version__)
"""


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, or None when it can."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vllm is not installed in this venv ({exc}); run `make test-vllm`"
    flags = ""
    if Path("/proc/cpuinfo").exists():
        words = Path("/proc/cpuinfo").read_text().split()
        flags = " ".join(sorted({w for w in words if w.startswith(("avx", "amx"))}))
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        return f"vLLM's CPU kernels do not load on this CPU ({flags or 'no AVX flags'}): {tail}"
    return None


@pytest.fixture(scope="session", autouse=True)
def vllm_runs() -> None:
    """Skip every vLLM test, with the reason, where vLLM cannot run."""
    reason = vllm_unavailable()
    if reason is not None:
        print(f"\nskipping the vLLM engine's tests: {reason}", file=sys.stderr)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_client(
    request: pytest.FixtureRequest,
    vllm_runs: None,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CompletionClient]:
    """A client on one real worker process with CQ_ENGINE=vllm, shared by every test here."""
    tmp = tmp_path_factory.mktemp("vllm")
    settings = Settings(
        broker_url=f"redis://127.0.0.1:{redis_server.port}/7",
        database_url=new_database("sqlite", request, tmp),
        data_dir=tmp,
        model=str(tiny_model),
        engine="vllm",
        batch_size=16,
        batch_wait_ms=20,
    )
    # vLLM takes 20 to 60 s to start here, more on a cold compile cache.
    worker = WorkerProcess(worker_env(settings), tmp / "worker.log").start().wait_ready(600)
    with CompletionClient(settings=settings) as client:
        yield client
    worker.stop()


@pytest.fixture(scope="session")
def offline(vllm_runs: None, tiny_model: Path) -> Any:
    """vLLM's own offline ``LLM`` on the tiny model, in this process: what jobs must equal."""
    # In-process engine core, as in the worker; a small KV cache, not most of the host's memory.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(
        model=str(tiny_model),
        dtype=os.environ.get("CQ_DTYPE", "float32"),
        kv_cache_memory_bytes=64 << 20,
        max_model_len=512,
        seed=0,
    )

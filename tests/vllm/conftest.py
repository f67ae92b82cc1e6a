"""The vLLM engine's fixtures: two workers with CQ_ENGINE=vllm, and vLLM's own offline LLM.

One worker runs at full speed; the other's every engine step is slowed by the fault
plugin in faults/ (a big model's decoding step), so a job runs for seconds and a test
can watch, stream, cancel, time out or kill it. Each is started once per session
(vLLM takes 20 to 60 s to start here) on its own Redis db and database.

These tests run on `make install-vllm`'s venv (`make test-vllm`); `make test` does not
collect them. Where vllm is not installed, or its CPU kernels cannot load on the CPU at
hand, every test here skips, saying why: CI never fails for the CPU's sake.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from completion_queue import EmbeddedRedis, WorkerProcess, free_port, worker_env
from engine.auto import vllm_unavailable
from producer.client import CompletionClient
from tests.conftest import worker_settings

FAULTS_DIR = Path(__file__).resolve().parent / "faults"
#: Seconds each engine step of the slowed worker sleeps: 200 tokens take 4 s or more.
STEP_S = 0.02
#: The slowed worker's job time limit: shorter than the default (600 s) so a test can pass
#: it, long enough that its other jobs end well within it.
SLOW_JOB_TIMEOUT_S = 15.0
#: A prompt holding this stalls every step of its call by STALL_S: past any time limit.
STALL, STALL_S = "STALL", 0.5
#: The tiny model's end tokens (its tokenizer's EOS and its generation config's).
EOS_IDS = [0, 2]


@pytest.fixture(scope="session", autouse=True)
def vllm_runs() -> None:
    """Skip every vLLM test, with the reason, where vLLM cannot run."""
    reason = vllm_unavailable()
    if reason is not None:
        print(f"\nskipping the vLLM engine's tests: {reason}", file=sys.stderr)
        pytest.skip(reason)


@dataclass
class VllmWorker:
    """A real worker process with CQ_ENGINE=vllm, and a client on its broker db and database."""

    worker: WorkerProcess
    client: CompletionClient


def start_vllm_worker(
    request: pytest.FixtureRequest,
    redis_port: int,
    redis_db: int,
    model: Path,
    tmp: Path,
    faults: dict[str, object] | None = None,
    database_url: str | None = None,
    **overrides: object,
) -> VllmWorker:
    """Start a vLLM worker on its own Redis db and SQLite database (a new one unless
    ``database_url``); wait until it is ready."""
    settings = worker_settings(
        request,
        redis_port,
        redis_db,
        model,
        tmp,
        database_url,
        engine="vllm",
        **{"batch_size": 16, "batch_wait_ms": 20, **overrides},
    )
    env = worker_env(settings)
    if faults:
        env["CQ_TEST_FAULTS"] = json.dumps(faults)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH")) if p
        )
    # vLLM takes 20 to 60 s to start here, more on a cold compile cache.
    worker = WorkerProcess(env, tmp / "worker.log").start().wait_ready(600)
    return VllmWorker(worker, CompletionClient(settings=settings))


@pytest.fixture(scope="session")
def vllm_client(
    request: pytest.FixtureRequest,
    vllm_runs: None,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CompletionClient]:
    """A client on one real vLLM worker at full speed, serving its metrics, shared by
    every test here."""
    tmp = tmp_path_factory.mktemp("vllm")
    started = start_vllm_worker(
        request, redis_server.port, 7, tiny_model, tmp, metrics_port=free_port()
    )
    with started.client as client:
        yield client
    started.worker.stop()


@pytest.fixture(scope="session")
def slow_vllm(
    request: pytest.FixtureRequest,
    vllm_runs: None,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmWorker]:
    """One real vLLM worker whose every engine step takes STEP_S or more, shared by the
    tests of progress, cancel, streaming, the time limit and a killed model process."""
    tmp = tmp_path_factory.mktemp("vllm-slow")
    faults = {"step_s": STEP_S, "stall": STALL, "stall_s": STALL_S}
    started = start_vllm_worker(
        request,
        redis_server.port,
        8,
        tiny_model,
        tmp,
        faults=faults,
        job_timeout_s=SLOW_JOB_TIMEOUT_S,
    )
    yield started
    started.client.close()
    started.worker.stop()


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


def offline_choice(offline: Any, prompt: Any, max_tokens: int, **params: Any) -> Any:
    """vLLM's own completion of ``prompt`` (its first choice): a text, or vLLM's
    ``{"prompt_token_ids": [...]}``."""
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, stop_token_ids=EOS_IDS, **params)
    return offline.generate([prompt], sampling, use_tqdm=False)[0].outputs[0]


def kept_tokens(completion: Any) -> int:
    """Tokens vLLM generated, less the end token it appends when EOS ends the row."""
    ids = list(completion.token_ids)
    return len(ids) - (1 if ids and ids[-1] in EOS_IDS else 0)

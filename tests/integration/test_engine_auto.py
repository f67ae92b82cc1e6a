"""``CQ_ENGINE=auto`` in the default venv: no vLLM here, so a real worker runs the static
engine, says why in its log, and describes itself with the engine it picked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from completion_queue import EmbeddedRedis, WorkerProcess, create_app, worker_env
from db import JobStatus
from producer.client import CompletionClient
from producer.stats import live_workers
from tests.conftest import worker_settings

AUTO_REDIS_DB = 9

pytestmark = pytest.mark.timeout(300)


def test_auto_without_vllm_runs_the_static_engine_and_says_why(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: tests/vllm checks that auto picks it")
    # Given a worker started with CQ_ENGINE=auto where vllm is not installed
    settings = worker_settings(
        request, redis_server.port, AUTO_REDIS_DB, tiny_model, tmp_path, engine="auto"
    )
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start()
    try:
        worker.wait_ready(240)
        # When a job runs on it, and `cq workers` (Flower: the same stats) asks what it runs
        with CompletionClient(settings=settings) as client:
            job = client.wait(client.submit("Hello", max_new_tokens=4, temperature=0), timeout=60)
        app = create_app(settings)
        try:
            [found] = live_workers(app, timeout_s=5)
        finally:
            app.close()
    finally:
        worker.stop()
    # Then the job ran, on the static engine, and the worker logged the pick and its reason
    assert job.status is JobStatus.SUCCEEDED and job.completion_tokens
    assert (found.hostname, found.engine) == (worker.nodename, "static")
    log = worker.log_path.read_text()
    assert "CQ_ENGINE=auto runs the static engine: vllm is not installed" in log
    assert "(static engine)" in log

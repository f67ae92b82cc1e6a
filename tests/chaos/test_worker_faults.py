"""Faults done for real on worker processes: no job lost, none doubled."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from completion_queue.local import WorkerProcess
from completion_queue.redis_server import EmbeddedRedis
from completion_queue.settings import Settings
from db.models import JobStatus
from producer.cli import worker_env
from producer.client import CompletionClient
from tests.conftest import new_database


@pytest.fixture
def own_worker(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path: Path,
) -> Iterator[tuple[Settings, WorkerProcess]]:
    """A worker of this test's own, on its own Redis db and SQLite database."""
    settings = Settings(
        broker_url=f"redis://127.0.0.1:{redis_server.port}/5",
        database_url=new_database("sqlite", request, tmp_path),
        data_dir=tmp_path,
        model=str(tiny_model),
        batch_size=8,
        batch_lookahead=1,
        batch_wait_ms=20,
    )
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start().wait_ready()
    yield settings, worker
    worker.stop()


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def test_sigkill_of_the_model_process_mid_batch_loses_no_job(
    own_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = own_worker
    with CompletionClient(settings=settings) as client:
        # Given a batch of long jobs running in the worker's model process
        jobs = client.submit_many(
            [{"prompt": f"story {i}", "max_new_tokens": 400, "temperature": 0} for i in range(8)]
        )
        wait_for(
            lambda: any(j.status is JobStatus.RUNNING for j in client.list(status="running")),
            60,
            "the batch to start",
        )
        victim = worker.pool_pids()[0]
        # When that process is killed mid-batch
        os.kill(victim, signal.SIGKILL)
        # Then every job is redelivered and completes once, on the restarted process
        done = client.wait(jobs, timeout=240)
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 8
    assert all(j.attempts == 2 for j in done)
    assert all(j.completion_tokens and j.completion_tokens > 0 for j in done)
    assert worker.alive() and victim not in worker.pool_pids()

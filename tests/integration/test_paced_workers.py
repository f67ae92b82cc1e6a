"""Paced workers (``CQ_ENGINE=paced``, no model): real worker processes on PostgreSQL.

The control-plane bench (``benchmarks/control_plane.py``) runs up to 64 of them on two
cores; here two, at the default step, show the contract it relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from sqlalchemy import select

from completion_queue import EmbeddedRedis, Settings, WorkerProcess, stop_workers, worker_env
from db import JobRow, JobStatus, make_engine, make_session_factory, upgrade
from producer.client import CompletionClient
from tests.services import PostgresCluster

#: A Redis database of the shared server no other fixture uses.
PACED_REDIS_DB = 11


@pytest.fixture(scope="module")
def paced(
    redis_server: EmbeddedRedis,
    postgres: PostgresCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, list[WorkerProcess]]]:
    """Two paced workers at the default settings, on PostgreSQL and their own Redis db."""
    tmp = tmp_path_factory.mktemp("paced")
    broker = f"redis://127.0.0.1:{redis_server.port}/{PACED_REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(
        broker_url=broker,
        database_url=postgres.create_database("cq_paced"),
        data_dir=tmp,
        model="paced-test",
        engine="paced",
    )
    upgrade(settings.resolved_database_url())
    workers = [
        WorkerProcess(worker_env(settings), tmp / f"worker-{i}.log").start() for i in range(2)
    ]
    for worker in workers:
        worker.wait_ready()
    yield settings, workers
    stop_workers(workers)


def test_paced_workers_return_each_jobs_budget_at_the_pace(
    paced: tuple[Settings, list[WorkerProcess]],
) -> None:
    settings, workers = paced
    step_s = settings.paced_step_ms / 1000
    budgets = [1 + i % 24 for i in range(96)]
    with CompletionClient(settings=settings) as client:
        # Given 96 jobs of 1 to 24 new tokens, three groups' worth per worker
        jobs = client.submit_many(
            [{"prompt": f"paced {i}", "max_new_tokens": n} for i, n in enumerate(budgets)]
        )
        # When both workers run them
        done = client.wait(jobs, timeout=120)
    # Then every job has exactly its budget of the fixed text
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * len(budgets)
    assert [j.completion_tokens for j in done] == budgets
    assert [j.text for j in done] == [("paced " * 4)[:n] for n in budgets]
    # and each took at least its longest batch-mate's tokens times the step
    sessions = make_session_factory(make_engine(settings.resolved_database_url()))
    with sessions() as session:
        rows = session.execute(
            select(JobRow.worker, JobRow.started_at, JobRow.finished_at, JobRow.completion_tokens)
        ).all()
    for _, started, finished, tokens in rows:
        assert (finished - started).total_seconds() >= tokens * step_s * 0.99
    # and both workers, each its own node, ran jobs
    assert {worker for worker, *_ in rows} == {w.nodename for w in workers}


def test_a_paced_worker_loads_no_torch(paced: tuple[Settings, list[WorkerProcess]]) -> None:
    _, workers = paced
    for worker in workers:
        (model_process,) = worker.pool_pids()
        for pid in (worker.pid, model_process):
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
            # A model process holding torch is 300 MB or more; a paced one is the queue side.
            assert psutil.Process(pid).memory_info().rss < 200 * 2**20

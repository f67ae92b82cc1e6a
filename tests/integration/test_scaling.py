"""Routing and scale-out on real processes: two models, shared queues, priorities, retention."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from completion_queue import WorkerProcess, create_app, queue_name, stop_workers, worker_env
from db import (
    Choice,
    JobRow,
    JobStatus,
    NewJob,
    Outcome,
    claim_jobs,
    create_jobs,
    finish_jobs,
    make_engine,
    make_session_factory,
    utcnow,
)
from producer.client import CompletionClient
from tests.conftest import Stack
from tests.reference import Reference

SQLITE_ONLY = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model: same shape, other weights (seed 1, 20 training steps: 4 s, not 24)."""
    from engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2-b", seed=1, steps=20)


@SQLITE_ONLY
def test_jobs_reach_only_workers_of_their_model_and_share_a_queue(
    stack: Stack,
    client: CompletionClient,
    other_model: Path,
    reference: Reference,
    tmp_path: Path,
) -> None:
    model_a, model_b = stack.settings.model, str(other_model)
    # Given the stack's worker and a second one on model A, and a third on model B
    a2_settings = stack.settings.model_copy(update={"metrics_port": 0})
    b_settings = a2_settings.model_copy(update={"model": model_b})
    a2 = WorkerProcess(worker_env(a2_settings), tmp_path / "a2.log").start()
    b = WorkerProcess(worker_env(b_settings), tmp_path / "b.log").start()
    try:
        a2.wait_ready()
        b.wait_ready()
        # When jobs for both models are submitted, interleaved
        requests = [
            {
                "prompt": f"Once upon a time {i}",
                "max_new_tokens": 6,
                "temperature": 0,
                "model": model_b if i % 4 == 0 else model_a,
            }
            for i in range(96)
        ]
        done = client.wait(client.submit_many(requests), timeout=180)
    finally:
        stop_workers([a2, b])
    # (stopped together, each warm: exit code 0)
    assert [w.process and w.process.returncode for w in (a2, b)] == [0, 0]
    # Then every job ran on a worker of its own model, with that model's weights
    a_workers = {stack.worker.nodename, a2.nodename}
    ref_b = Reference(other_model)
    for request, job in zip(requests, done, strict=True):
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.model == request["model"]
        if job.model == model_b:
            assert job.worker == b.nodename
            assert job.text == ref_b.greedy(job.prompt, 6)[0]
        else:
            assert job.worker in a_workers
            assert job.text == reference.greedy(job.prompt, 6)[0]
    # And both workers of model A took a share of its queue
    assert {job.worker for job in done if job.model == model_a} == a_workers
    assert reference.greedy("Once upon a time 0", 6) != ref_b.greedy("Once upon a time 0", 6)


@SQLITE_ONLY
def test_high_priority_job_overtakes_queued_normal_ones(
    stack: Stack, client: CompletionClient
) -> None:
    queue = queue_name(stack.settings.model)
    control = create_app(stack.settings).control
    node = [stack.worker.nodename]
    batch = stack.settings.batch_size
    # Given a worker that stopped consuming, 3 batches of normal jobs, then an urgent one
    assert control.cancel_consumer(queue, reply=True, timeout=5, destination=node)
    try:
        normal = client.submit_many(
            [{"prompt": f"normal {i}", "max_new_tokens": 2} for i in range(3 * batch)]
        )
        urgent = client.submit("urgent", max_new_tokens=2, priority=9)
    finally:
        # When the worker consumes again (it prefetches 2 batches at once)
        assert control.add_consumer(queue, reply=True, timeout=5, destination=node)
    done = client.wait([*normal, urgent], timeout=120)
    assert {j.status for j in done} == {JobStatus.SUCCEEDED}
    # Then the urgent job ran in the first batch, ahead of the queued normal ones
    urgent_done = done[-1]
    assert urgent_done.started_at is not None
    starts = [j.started_at for j in done[:-1] if j.started_at is not None]
    assert urgent_done.started_at <= min(starts)
    assert sum(start > urgent_done.started_at for start in starts) >= 2 * batch - 1


def run_prune(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CQ_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "cli", "prune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cq_prune(database_url: str, *args: str) -> str:
    done = run_prune(database_url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prune_removes_old_finished_jobs_only(database_url: str) -> None:
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    # Given jobs that finished 8 days ago, 1 day ago, and old ones still queued
    kinds = {
        "old-ok": JobStatus.SUCCEEDED,
        "old-failed": JobStatus.FAILED,
        "new-ok": JobStatus.SUCCEEDED,
        "old-queued": JobStatus.QUEUED,
    }
    ids: dict[str, list[uuid.UUID]] = {}
    with sessions.begin() as session:
        for kind, status in kinds.items():
            jobs = [NewJob(model="m", prompt=kind, params={}) for _ in range(3)]
            ids[kind] = [job.id for job, _ in create_jobs(session, jobs=jobs)]
            if status is JobStatus.QUEUED:
                continue
            claimed = claim_jobs(session, job_ids=ids[kind], worker="w")
            finish_jobs(
                session,
                outcomes=[
                    Outcome(
                        job_id=j.id,
                        attempt=j.attempts,
                        status=status,
                        choices=[Choice("x", "length", 1)] if status is JobStatus.SUCCEEDED else [],
                        error=None
                        if status is JobStatus.SUCCEEDED
                        else {"type": "E", "message": "m"},
                    )
                    for j in claimed
                ],
            )
        for kind, age in (("old-ok", 8), ("old-failed", 8), ("new-ok", 1), ("old-queued", 8)):
            session.execute(
                update(JobRow)
                .where(JobRow.id.in_(ids[kind]))
                .values(created_at=utcnow() - timedelta(days=age, hours=1))
            )
            if kind != "old-queued":
                session.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(ids[kind]))
                    .values(finished_at=utcnow() - timedelta(days=age))
                )

    def remaining() -> set[str]:
        with sessions() as session:
            return {row.prompt for row in session.query(JobRow)}

    # When pruning succeeded jobs older than 7 days, first as a dry run
    assert "would remove 3 job(s) (succeeded)" in _cq_prune(
        database_url, "--older-than", "7d", "--status", "succeeded", "--dry-run"
    )
    assert remaining() == set(kinds)
    assert "removed 3 job(s)" in _cq_prune(
        database_url, "--older-than", "7d", "--status", "succeeded"
    )
    # Then only the old succeeded ones went; then every old finished one
    assert remaining() == {"old-failed", "new-ok", "old-queued"}
    assert "removed 3 job(s)" in _cq_prune(database_url, "--older-than", "1w")
    assert remaining() == {"new-ok", "old-queued"}
    assert "removed 0 job(s)" in _cq_prune(
        database_url, "--older-than", "12h", "--status", "failed"
    )
    engine.dispose()


def test_prune_refuses_a_bad_duration_or_an_unfinished_status(database_url: str) -> None:
    for args, message in (
        (["--older-than", "7 days"], "is not a duration"),
        (["--older-than", "7d", "--status", "queued"], "queued"),
    ):
        done = run_prune(database_url, *args)
        assert done.returncode == 2 and message in done.stderr

"""The runner against a real database and a stand-in model: the attempt bound."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from db import (
    JobStatus,
    NewJob,
    claim_jobs,
    create_jobs,
    get_job,
    get_jobs,
    make_engine,
    make_session_factory,
)
from engine import GenerationRequest
from engine.static import GenerationResult
from tests.conftest import new_database
from workers.runner import BatchRunner


class CountingRuntime:
    """A model stand-in that returns empty results and counts the rows it ran."""

    context_length = 512

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.groups: list[list[str]] = []

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [[1, 2] for _ in prompts]

    def generate(self, group: Sequence[GenerationRequest], **_: Any) -> list[GenerationResult]:
        self.ran += [r.key for r in group]
        self.groups.append([r.key for r in group])
        return [GenerationResult(choices=[], prompt_tokens=2) for _ in group]


def test_a_job_claimed_max_attempts_times_fails_without_running(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sessions = make_session_factory(make_engine(new_database("sqlite", request, tmp_path)))
    with sessions.begin() as session:
        (doomed, _), (fresh, _) = create_jobs(
            session,
            jobs=[
                NewJob(model="m", prompt="a", params={}),
                NewJob(model="m", prompt="b", params={}),
            ],
        )
        # Given a job whose worker died twice mid-batch
        for _ in range(2):
            claim_jobs(session, job_ids=[doomed.id], worker="lost")
    runtime = CountingRuntime()
    runner = BatchRunner(runtime, sessions, max_rows=8, max_attempts=2)  # type: ignore[arg-type]
    # When its message is delivered a third time, beside a fresh job
    runner.run([str(doomed.id), str(fresh.id)], worker="w")
    # Then it fails with AttemptsExceeded and never runs; the fresh job runs
    with sessions() as session:
        failed = get_job(session, job_id=doomed.id)
        ran = get_job(session, job_id=fresh.id)
    assert failed is not None and failed.status is JobStatus.FAILED and failed.attempts == 2
    assert failed.error is not None and failed.error["type"] == "AttemptsExceeded"
    assert ran is not None and ran.status is JobStatus.SUCCEEDED
    assert runtime.ran == [str(fresh.id)]


def test_a_job_whose_worker_died_under_it_twice_runs_alone_and_last(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sessions = make_session_factory(make_engine(new_database("sqlite", request, tmp_path)))
    with sessions.begin() as session:
        created = create_jobs(
            session,
            jobs=[NewJob(model="m", prompt=str(i), params={}) for i in range(6)],
        )
        jobs = [job for job, _ in created]
        # Given two jobs claimed twice and one three times without finishing (crashes)
        for job, deaths in zip(jobs[:3], (3, 2, 2), strict=True):
            for _ in range(deaths):
                claim_jobs(session, job_ids=[job.id], worker="lost")
    runtime = CountingRuntime()
    runner = BatchRunner(runtime, sessions, max_rows=8, max_attempts=5)  # type: ignore[arg-type]
    # When they come in one flush with three fresh jobs
    runner.run([str(job.id) for job in jobs], worker="w")
    # Then the fresh jobs run together first, then each suspect alone, fewest deaths first
    keys = [str(job.id) for job in jobs]
    assert runtime.groups[0] == keys[3:]
    assert runtime.groups[1:] == [[keys[1]], [keys[2]], [keys[0]]]
    with sessions() as session:
        done = get_jobs(session, job_ids=[job.id for job in jobs]).values()
    assert {job.status for job in done} == {JobStatus.SUCCEEDED}
    assert sorted(job.attempts for job in done) == [1, 1, 1, 3, 3, 4]

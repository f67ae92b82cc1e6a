"""The fenced update on SQLite and PostgreSQL: a row changes only at the attempt and status read."""

from __future__ import annotations

import pytest

from db import (
    JobStatus,
    NewJob,
    cancel_jobs,
    claim_jobs,
    create_jobs,
    get_job,
    make_engine,
    make_session_factory,
)
from db.fence import Fenced, fenced_update


def test_each_write_lands_only_at_its_own_attempt_and_status(database_url: str) -> None:
    sessions = make_session_factory(make_engine(database_url))
    queued, running, cancelled, stale = (NewJob(model="m", prompt="p", params={}) for _ in "abcd")
    with sessions.begin() as s:
        create_jobs(s, jobs=[queued, running, cancelled, stale])
        claim_jobs(s, job_ids=[running.id, cancelled.id, stale.id], worker="w")
        cancel_jobs(s, job_ids=[cancelled.id])
    unfinished = (JobStatus.QUEUED, JobStatus.RUNNING)
    # Given one executemany whose writes expect different statuses (a set, or one)
    writes = [
        Fenced(queued.id, 0, unfinished, {"completion_tokens": 1}),
        Fenced(running.id, 1, JobStatus.RUNNING, {"completion_tokens": 2}),
        Fenced(cancelled.id, 1, JobStatus.RUNNING, {"completion_tokens": 3}),
        Fenced(stale.id, 0, unfinished, {"completion_tokens": 4}),
    ]
    # When it runs
    with sessions.begin() as s:
        changed = fenced_update(s, writes, worker="fenced")
    # Then only the rows still at the attempt and in a status their write expected change
    assert changed == 2
    with sessions() as s:
        rows = [get_job(s, job_id=job.id) for job in (queued, running, cancelled, stale)]
    assert [(r.completion_tokens, r.worker) for r in rows if r is not None] == [
        (1, "fenced"),
        (2, "fenced"),
        (None, "w"),
        (None, "w"),
    ]


def test_writes_of_one_update_must_set_the_same_columns(database_url: str) -> None:
    sessions = make_session_factory(make_engine(database_url))
    job = NewJob(model="m", prompt="p", params={})
    with sessions.begin() as s:
        create_jobs(s, jobs=[job])
        writes = [
            Fenced(job.id, 0, JobStatus.QUEUED, {"completion_tokens": 1}),
            Fenced(job.id, 0, JobStatus.QUEUED, {"prompt_tokens": 1}),
        ]
        with pytest.raises(ValueError, match="same columns"):
            fenced_update(s, writes)
    with pytest.raises(ValueError, match="must expect a status"):
        Fenced(job.id, 0, ())

"""State transitions on real SQLite and PostgreSQL: exactly one result per job."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import inspect, update

from db import (
    Choice,
    DeadlineErrors,
    Finished,
    JobRow,
    JobStatus,
    NewJob,
    Outcome,
    cancel_job,
    claim_jobs,
    create_jobs,
    fail_past_deadline,
    finish_jobs,
    get_job,
    make_engine,
    make_session_factory,
    utcnow,
    withdraw_jobs,
)


def test_schema_comes_from_migrations(database_url: str) -> None:
    engine = make_engine(database_url)
    columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert columns >= {
        "id",
        "status",
        "model",
        "prompt",
        "params",
        "choices",
        "prompt_tokens",
        "completion_tokens",
        "error",
        "attempts",
        "worker",
        "priority",
        "idempotency_key",
        "batch_id",
        "created_at",
        "started_at",
        "finished_at",
        "truncated_prompt_tokens",
    }
    assert "alembic_version" in inspect(engine).get_table_names()
    if database_url.startswith("sqlite"):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    engine.dispose()


def test_results_are_written_once_by_the_attempt_holding_the_job(database_url: str) -> None:
    sessions = make_session_factory(make_engine(database_url))
    job = NewJob(model="m", prompt="p", params={"max_new_tokens": 2})
    with sessions.begin() as s:
        create_jobs(s, jobs=[job])
    # Given two deliveries of the same message: the second claim takes over the job
    with sessions.begin() as s:
        first = claim_jobs(s, job_ids=[job.id], worker="w1")[0]
    with sessions.begin() as s:
        second = claim_jobs(s, job_ids=[job.id], worker="w2")[0]
    assert (first.attempts, second.attempts) == (1, 2)
    choice = Choice(text="late", finish_reason="length", completion_tokens=2)
    # When the first attempt finishes late, it changes nothing
    with sessions.begin() as s:
        late = Outcome(job.id, 1, JobStatus.SUCCEEDED, [choice], 1)
        assert finish_jobs(s, outcomes=[late]) == Finished(0)
    win = Choice(text="win", finish_reason="length", completion_tokens=2)
    with sessions.begin() as s:
        assert (
            finish_jobs(s, outcomes=[Outcome(job.id, 2, JobStatus.SUCCEEDED, [win], 1)]).changed
            == 1
        )
    # And a finished job is never claimed again
    with sessions.begin() as s:
        assert claim_jobs(s, job_ids=[job.id], worker="w3") == []
        final = get_job(s, job_id=job.id)
    assert final is not None
    assert (final.status, final.text, final.worker, final.attempts) == (
        JobStatus.SUCCEEDED,
        "win",
        "w2",
        2,
    )


def test_a_job_cancelled_while_running_keeps_what_it_generated(database_url: str) -> None:
    sessions = make_session_factory(make_engine(database_url))
    jobs = [NewJob(model="m", prompt=f"p{i}", params={}) for i in range(3)]
    with sessions.begin() as s:
        create_jobs(s, jobs=jobs)
        claimed = claim_jobs(s, job_ids=[j.id for j in jobs], worker="w")
    assert all(j.status is JobStatus.RUNNING for j in claimed)
    # Given one of three running jobs cancelled after its worker's last look
    with sessions.begin() as s:
        cancelled = cancel_job(s, job_id=jobs[1].id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    choice = Choice(text="t", finish_reason="length", completion_tokens=1)
    # When the worker writes the batch's results
    with sessions.begin() as s:
        outcomes = [Outcome(j.id, 1, JobStatus.SUCCEEDED, [choice], 1) for j in jobs]
        finished = finish_jobs(s, outcomes=outcomes)
        rows = [get_job(s, job_id=j.id) for j in jobs]
    # Then the cancelled job stays cancelled, is named as such (its outcome said succeeded),
    # and keeps its tokens, which ended on their own
    assert finished == Finished(3, frozenset({jobs[1].id}))
    assert [r.status for r in rows if r] == [
        JobStatus.SUCCEEDED,
        JobStatus.CANCELLED,
        JobStatus.SUCCEEDED,
    ]
    assert rows[1] is not None and rows[1].choices == [choice]
    assert rows[1].completion_tokens == 1
    # and a late result of an earlier attempt of it changes nothing
    with sessions.begin() as s:
        late = Outcome(jobs[1].id, 0, JobStatus.SUCCEEDED, [choice], 1)
        assert finish_jobs(s, outcomes=[late]) == Finished(0)
    with sessions.begin() as s:
        assert cancel_job(s, job_id=uuid.uuid4()) is None


def test_idempotency_keys_are_unique(database_url: str) -> None:
    sessions = make_session_factory(make_engine(database_url))
    a = NewJob(model="m", prompt="a", params={}, idempotency_key="k")
    b = NewJob(model="m", prompt="b", params={}, idempotency_key="k")
    with sessions.begin() as s:
        assert create_jobs(s, jobs=[a])[0][1] is True
    with sessions.begin() as s:
        ((existing, is_new),) = create_jobs(s, jobs=[b])
    assert not is_new and existing.id == a.id and existing.prompt == "a"


def test_jobs_that_could_not_be_queued_are_taken_back_without_pulling_a_given_id(
    database_url: str,
) -> None:
    sessions = make_session_factory(make_engine(database_url))
    plain = NewJob(model="m", prompt="a", params={})
    keyed = NewJob(model="m", prompt="b", params={}, idempotency_key="k")
    with sessions.begin() as s:
        create_jobs(s, jobs=[plain, keyed])
    # Given a concurrent request with the same key, given the keyed job's id meanwhile
    with sessions.begin() as s:
        ((given, is_new),) = create_jobs(
            s, jobs=[NewJob(model="m", prompt="b", params={}, idempotency_key="k")]
        )
    assert not is_new and given.id == keyed.id
    # When the first request's messages could not be sent and its jobs are taken back
    error = {"type": "BrokerUnavailable", "message": "could not queue 2 job(s)"}
    with sessions.begin() as s:
        withdraw_jobs(s, job_ids=[plain.id, keyed.id], error=error)
    with sessions() as s:
        gone, kept = get_job(s, job_id=plain.id), get_job(s, job_id=keyed.id)
    # Then the job nobody else saw is gone; the given one still answers, failed, saying why
    assert gone is None
    assert kept is not None and kept.status is JobStatus.FAILED and kept.error == error
    # and its key is free: a retry with it queues the job anew
    assert kept.idempotency_key is None
    retry = NewJob(model="m", prompt="b", params={}, idempotency_key="k")
    with sessions.begin() as s:
        ((again, is_new),) = create_jobs(s, jobs=[retry])
    assert is_new and again.id == retry.id and again.status is JobStatus.QUEUED


def test_a_claim_never_takes_a_job_past_its_deadline(database_url: str) -> None:
    # Given a queued job past its deadline, one with time left, and a running one whose
    # deadline passed after it started
    sessions = make_session_factory(make_engine(database_url))
    past, future = utcnow() - timedelta(seconds=1), utcnow() + timedelta(minutes=1)
    late, on_time, started = (
        NewJob("m", "p", {}, deadline=past),
        NewJob("m", "p", {}, deadline=future),
        NewJob("m", "p", {}, deadline=future),
    )
    errors = DeadlineErrors(
        deadline={"type": "DeadlineExceeded", "message": "late"},
        window={"type": "BatchExpired", "message": "window"},
    )
    with sessions.begin() as s:
        create_jobs(s, jobs=[late, on_time, started])
        claim_jobs(s, job_ids=[started.id], worker="w")
        s.execute(update(JobRow).where(JobRow.id == started.id).values(deadline=past))
    # When a worker claims all three (a redelivery of the running one among them)
    with sessions.begin() as s:
        claimed = claim_jobs(s, job_ids=[late.id, on_time.id, started.id], worker="w")
        failed = fail_past_deadline(s, errors=errors, job_ids=[late.id, on_time.id, started.id])
    # Then the late one is not claimed but failed; the others are claimed and run
    assert {job.id for job in claimed} == {on_time.id, started.id}
    assert failed == [late.id]
    with sessions() as s:
        row = get_job(s, job_id=late.id)
    assert row is not None and row.status is JobStatus.FAILED and row.attempts == 0
    assert row.error == errors.deadline and row.started_at is None

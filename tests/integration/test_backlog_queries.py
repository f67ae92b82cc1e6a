"""The backlog's SQL on SQLite and PostgreSQL: queued and running jobs per model and tenant
with their estimated tokens, and what each worker served each tenant since a time."""

from __future__ import annotations

from datetime import timedelta

from db import (
    Choice,
    JobStatus,
    NewJob,
    Outcome,
    claim_jobs,
    create_jobs,
    finish_jobs,
    make_engine,
    make_session_factory,
    served_since,
    unfinished_load,
    utcnow,
)


def test_load_and_served_tokens_per_model_tenant_and_worker(database_url: str) -> None:
    # Given jobs of two tenants and one without, each with its estimate, one without any
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    jobs = [
        NewJob("m", "p", {}, tenant="acme", cost=(10, 20)),
        NewJob("m", "p", {}, tenant="acme", cost=(5, 16)),
        NewJob("m", "p", {}, tenant="acme", cost=(1, 2)),
        NewJob("m", "p", {}, tenant=None, cost=(3, 4)),
        NewJob("other", "p", {}, tenant="beta"),
    ]
    before = utcnow()
    with sessions.begin() as session:
        created = [job for job, _ in create_jobs(session, jobs=jobs)]
    # When worker w1 runs acme's first two jobs, and finishes the second
    with sessions.begin() as session:
        claim_jobs(session, job_ids=[created[0].id, created[1].id], worker="w1")
        finish_jobs(
            session,
            outcomes=[
                Outcome(created[1].id, 1, JobStatus.SUCCEEDED, [Choice("x", "length", 7)], 3)
            ],
        )
    # Then the load groups them by model, tenant and status, with their estimates summed
    with sessions() as session:
        load = {(x.model, x.tenant, x.status): x for x in unfinished_load(session)}
        served = served_since(session, since=before)
        later = served_since(session, since=utcnow() + timedelta(seconds=1))
    engine.dispose()
    summary = {key: (x.jobs, x.prompt_tokens, x.new_tokens) for key, x in load.items()}
    assert summary == {
        ("m", "acme", JobStatus.QUEUED): (1, 1, 2),
        ("m", "acme", JobStatus.RUNNING): (1, 10, 20),
        ("m", None, JobStatus.QUEUED): (1, 3, 4),
        ("other", "beta", JobStatus.QUEUED): (1, 0, 0),
    }
    # And what w1 served acme: the finished job's prompt plus completion tokens
    [row] = served
    assert (row.model, row.tenant, row.worker, row.jobs, row.tokens) == ("m", "acme", "w1", 1, 10)
    assert row.first_started_at is not None
    assert before <= row.first_started_at <= row.last_finished_at
    assert later == []

"""Migration 0007 (lanes, deadlines, tenant weights) up and down, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta

from alembic import command
from sqlalchemy import inspect, text

from db import (
    LANE_BATCH,
    NewJob,
    create_jobs,
    create_tenant,
    get_job,
    make_engine,
    make_session_factory,
    revoke_tenant,
    tenant_weights,
    utcnow,
)
from db.migrate import alembic_config

OLD_JOB = text(
    "INSERT INTO jobs (id, status, model, prompt, params, attempts, priority, created_at, "
    "webhook_attempts, batch_id) VALUES (:id, 'queued', 'm', 'p', '{}', 0, 0, :now, 0, :batch)"
)
OLD_BATCH = text(
    "INSERT INTO batches (id, input_file_id, endpoint, completion_window, requests, created_at) "
    "VALUES ('batch_old', 'file-x', '/v1/completions', '24h', '[]', :now)"
)
OLD_TENANT = text("INSERT INTO tenants (name, key_hash, created_at) VALUES ('old', :hash, :now)")


def columns(url: str, table: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_0007_fills_old_rows_with_defaults_and_round_trips(database_url: str) -> None:
    # Given a database at 0006 holding a job and a tenant
    config = alembic_config(database_url)
    command.downgrade(config, "0006")
    assert not {"lane", "deadline"} & columns(database_url, "jobs")
    assert "weight" not in columns(database_url, "tenants")
    engine = make_engine(database_url)
    job_id, line_id = uuid.uuid4(), uuid.uuid4()
    batch_created = utcnow() - timedelta(hours=1)

    def stored(i: uuid.UUID) -> str:
        return str(i) if engine.dialect.name == "postgresql" else i.hex

    with engine.begin() as conn:
        conn.execute(OLD_JOB, {"id": stored(job_id), "now": utcnow(), "batch": None})
        conn.execute(OLD_JOB, {"id": stored(line_id), "now": utcnow(), "batch": "batch_old"})
        conn.execute(OLD_BATCH, {"now": batch_created})
        conn.execute(OLD_TENANT, {"hash": "0" * 64, "now": utcnow()})
    # When it goes up to head
    command.upgrade(config, "head")
    # Then the old rows read the defaults (a batch's line: its window's end as its deadline),
    # and new rows keep what they are given
    sessions = make_session_factory(engine)
    deadline = utcnow() + timedelta(hours=1)
    with sessions.begin() as session:
        old = get_job(session, job_id=job_id)
        line = get_job(session, job_id=line_id)
        [(new, _)] = create_jobs(
            session, jobs=[NewJob("m", "p", {}, lane=LANE_BATCH, deadline=deadline)]
        )
        create_tenant(session, name="heavy", key="k", weight=2.5)
        create_tenant(session, name="gone", key="k2")
        revoke_tenant(session, name="gone")
    with sessions() as session:
        stored = get_job(session, job_id=new.id)
        weights = tenant_weights(session)
    assert old is not None and (old.lane, old.deadline) == ("interactive", None)
    assert line is not None and line.lane == "batch"
    assert line.deadline == batch_created + timedelta(hours=24)
    assert stored is not None and (stored.lane, stored.deadline) == ("batch", deadline)
    assert weights == {"old": 1.0, "heavy": 2.5}
    # And down to 0006 again the columns go, the jobs stay, and the partial unique index of
    # idempotency keys without a tenant keeps its WHERE (SQLite copies the table to drop)
    command.downgrade(config, "0006")
    assert not {"lane", "deadline"} & columns(database_url, "jobs")
    assert "weight" not in columns(database_url, "tenants")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 3
        if engine.dialect.name == "sqlite":
            index = conn.execute(
                text(
                    "SELECT sql FROM sqlite_master WHERE name = 'uq_jobs_idempotency_key_no_tenant'"
                )
            ).scalar_one()
            assert "WHERE tenant IS NULL" in index
    command.upgrade(config, "head")
    assert {"lane", "deadline"} <= columns(database_url, "jobs")
    engine.dispose()

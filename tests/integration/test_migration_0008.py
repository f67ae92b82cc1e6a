"""Migration 0008 (each job's estimated cost) up and down, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid

from alembic import command
from sqlalchemy import inspect, text

from db import make_engine
from db.migrate import alembic_config
from tests.integration.test_migration_0007 import columns

OLD_JOB = text(
    "INSERT INTO jobs (id, status, model, prompt, messages, params, attempts, priority, "
    "created_at, webhook_attempts) "
    "VALUES (:id, :status, 'm', :prompt, :messages, :params, 0, 0, CURRENT_TIMESTAMP, 0)"
)
COST = {"cost_prompt_tokens", "cost_new_tokens"}


def test_0008_estimates_unfinished_old_rows_and_round_trips(database_url: str) -> None:
    # Given a database at 0007 holding a queued prompt job, a running chat job and a
    # finished one
    config = alembic_config(database_url)
    command.downgrade(config, "0007")
    assert not COST & columns(database_url, "jobs")
    engine = make_engine(database_url)
    ids = {name: uuid.uuid4() for name in ("queued", "running", "succeeded")}

    def stored(i: uuid.UUID) -> str:
        return str(i) if engine.dialect.name == "postgresql" else i.hex

    chat = json.dumps([{"role": "user", "content": "x" * 9}])
    rows = [
        ("queued", "y" * 41, None, {"max_new_tokens": 20, "n": 2}),
        ("running", "", chat, {}),
        ("succeeded", "z" * 8, None, {"max_new_tokens": 5}),
    ]
    with engine.begin() as conn:
        for status, prompt, messages, params in rows:
            conn.execute(
                OLD_JOB,
                {
                    "id": stored(ids[status]),
                    "status": status,
                    "prompt": prompt,
                    "messages": messages,
                    "params": json.dumps(params),
                },
            )
    # When it goes up to head
    command.upgrade(config, "head")
    # Then the unfinished rows hold their estimate (characters / 4, max_new_tokens x n or 16),
    # the finished one none, and the backlog index exists
    with engine.connect() as conn:
        found = {
            status: (prompt, new)
            for status, prompt, new in conn.execute(
                text("SELECT status, cost_prompt_tokens, cost_new_tokens FROM jobs")
            )
        }
    assert found == {"queued": (11, 40), "running": (3, 16), "succeeded": (None, None)}
    indexes = {i["name"] for i in inspect(engine).get_indexes("jobs")}
    assert {"ix_jobs_backlog", "ix_jobs_finished_at"} <= indexes
    # And down to 0007 the columns and indexes go, the jobs stay
    command.downgrade(config, "0007")
    assert not COST & columns(database_url, "jobs")
    assert not {"ix_jobs_backlog", "ix_jobs_finished_at"} & {
        i["name"] for i in inspect(engine).get_indexes("jobs")
    }
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 3
    command.upgrade(config, "head")
    engine.dispose()

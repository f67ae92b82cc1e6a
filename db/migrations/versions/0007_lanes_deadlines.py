"""Add each job's lane and deadline, and each tenant's weight.

``jobs.lane`` is ``interactive`` (the default: calls that wait for their answer) or
``batch`` (batch lines, ``cq submit --file``); ``jobs.deadline`` is when a job must have
started by, or null for none; ``tenants.weight`` is the tenant's share of a model's
workers relative to the others' (1.0 each by default). Rows that exist get the defaults,
and the unfinished lines of OpenAI-style batches run in the batch lane, with their
batch's window as their deadline (created_at + 24 h), which they now expire by.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: db.batch_store.BATCH_WINDOW, spelled out: a migration must not change with the code.
BATCH_WINDOW = timedelta(hours=24)
BATCHES = sa.table("batches", sa.column("id", sa.String), sa.column("created_at", sa.DateTime))
JOBS = sa.table(
    "jobs",
    sa.column("batch_id", sa.String),
    sa.column("status", sa.String),
    sa.column("lane", sa.String),
    sa.column("deadline", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(
            sa.Column("lane", sa.String(16), nullable=False, server_default="interactive")
        )
        jobs.add_column(sa.Column("deadline", sa.DateTime(timezone=True)))
        # The reaper's pass over queued jobs past their deadline.
        jobs.create_index("ix_jobs_status_deadline", ["status", "deadline"])
    bind = op.get_bind()
    for batch_id, created_at in bind.execute(sa.select(BATCHES.c.id, BATCHES.c.created_at)):
        bind.execute(
            JOBS.update()
            .where(JOBS.c.batch_id == batch_id, JOBS.c.status.in_(("queued", "running")))
            .values(lane="batch", deadline=created_at + BATCH_WINDOW)
        )
    with op.batch_alter_table("tenants") as tenants:
        tenants.add_column(
            sa.Column("weight", sa.Float(), nullable=False, server_default=sa.text("1.0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("tenants") as tenants:
        tenants.drop_column("weight")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_status_deadline")
        jobs.drop_column("deadline")
        jobs.drop_column("lane")

"""Add each job's lane and deadline, and each tenant's weight.

``jobs.lane`` is ``interactive`` (the default: calls that wait for their answer) or
``batch`` (batch lines, ``cq submit --file``); ``jobs.deadline`` is when a job must have
started by, or null for none; ``tenants.weight`` is the tenant's share of a model's
workers relative to the others' (1.0 each by default). Rows that exist get the defaults.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(
            sa.Column("lane", sa.String(16), nullable=False, server_default="interactive")
        )
        jobs.add_column(sa.Column("deadline", sa.DateTime(timezone=True)))
        # The reaper's pass over queued jobs past their deadline.
        jobs.create_index("ix_jobs_status_deadline", ["status", "deadline"])
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

"""Add the HTTP API's tables (files, batches) and the job's webhook columns.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WEBHOOK_STATUSES = ("pending", "delivered", "failed")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("callback_url", sa.String(2048)))
        jobs.add_column(
            sa.Column(
                "webhook_status",
                sa.Enum(*WEBHOOK_STATUSES, name="webhook_status", native_enum=False, length=16),
            )
        )
        jobs.add_column(
            sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        jobs.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True)))
        jobs.add_column(sa.Column("webhook_error", sa.Text()))
        jobs.add_column(sa.Column("webhook_delivered_at", sa.DateTime(timezone=True)))
        jobs.create_index("ix_jobs_webhook_due", ["webhook_status", "webhook_next_at"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON()),
        sa.Column("requests", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("batches")
    op.drop_table("files")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_webhook_due")
        for column in (
            "webhook_delivered_at",
            "webhook_error",
            "webhook_next_at",
            "webhook_attempts",
            "webhook_status",
            "callback_url",
        ):
            jobs.drop_column(column)

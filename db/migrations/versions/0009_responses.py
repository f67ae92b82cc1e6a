"""Add the responses table: what an OpenAI response adds to its job.

One row per response, keyed by its job's id (the response id is ``resp_`` and that
id's hex): the instructions, the input items as given, the previous response it
continues, its metadata and text format, and whether it ran in the background.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(64)),
        sa.Column("instructions", sa.Text()),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("previous_response_id", sa.String(64)),
        sa.Column("metadata", sa.JSON()),
        sa.Column("text", sa.JSON()),
        sa.Column("background", sa.Boolean(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("responses")

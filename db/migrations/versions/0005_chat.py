"""Add the job's messages (a chat job's conversation; its prompt is then empty), and the
indexes that list a tenant's files and batches page by page.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("messages", sa.JSON()))
    op.create_index("ix_files_tenant_created_at", "files", ["tenant", "created_at", "id"])
    op.create_index("ix_batches_tenant_created_at", "batches", ["tenant", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_batches_tenant_created_at", table_name="batches")
    op.drop_index("ix_files_tenant_created_at", table_name="files")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("messages")

"""Add tenants (API keys and their quotas) and the tenant of each job, file and batch.

Idempotency keys become unique per tenant: the column's own unique constraint
gives way to one index on (tenant, key) and one on the key where there is no
tenant (a null tenant is distinct from every other in the first).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NO_TENANT = sa.text("tenant IS NULL")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("models", sa.JSON()),
        sa.Column("max_queued", sa.Integer()),
        sa.Column("rate", sa.Float()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    # 0001 left the unique constraint unnamed: PostgreSQL named it, SQLite's is named
    # here so that batch mode can drop it while it copies the table.
    naming = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
    with op.batch_alter_table("jobs", naming_convention=naming) as jobs:
        jobs.drop_constraint(
            "jobs_idempotency_key_key" if postgresql else "uq_jobs_idempotency_key",
            type_="unique",
        )
        jobs.add_column(sa.Column("tenant", sa.String(64)))
        jobs.create_index("ix_jobs_tenant_created_at", ["tenant", "created_at"])
        jobs.create_index(
            "uq_jobs_tenant_idempotency_key", ["tenant", "idempotency_key"], unique=True
        )
        jobs.create_index(
            "uq_jobs_idempotency_key_no_tenant",
            ["idempotency_key"],
            unique=True,
            sqlite_where=NO_TENANT,
            postgresql_where=NO_TENANT,
        )
    for table in ("files", "batches"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant", sa.String(64)))


def downgrade() -> None:
    for table in ("files", "batches"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("uq_jobs_idempotency_key_no_tenant")
        jobs.drop_index("uq_jobs_tenant_idempotency_key")
        jobs.drop_index("ix_jobs_tenant_created_at")
        jobs.drop_column("tenant")
        jobs.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
    op.drop_table("tenants")

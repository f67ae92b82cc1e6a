"""Notify on channel ``cq_jobs`` when a job's status or completion tokens change (PostgreSQL only;
on SQLite this revision does nothing: its readers poll).

The payload is ``{"id": <uuid>, "status": <status>, "completion_tokens": <int or null>}``
(see db/notify.py and docs/sql.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The channel is db.notify.NOTIFY_CHANNEL, spelled out: a migration must not change with the code.
CREATE_FUNCTION = """
CREATE OR REPLACE FUNCTION cq_jobs_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'cq_jobs',
        json_build_object(
            'id', NEW.id,
            'status', NEW.status,
            'completion_tokens', NEW.completion_tokens
        )::text
    );
    RETURN NULL;
END
$$
"""

CREATE_TRIGGER = """
CREATE TRIGGER jobs_notify
AFTER UPDATE ON jobs
FOR EACH ROW
WHEN (
    OLD.status IS DISTINCT FROM NEW.status
    OR OLD.completion_tokens IS DISTINCT FROM NEW.completion_tokens
)
EXECUTE FUNCTION cq_jobs_notify()
"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        op.execute(CREATE_FUNCTION)
        op.execute(CREATE_TRIGGER)


def downgrade() -> None:
    if _postgresql():
        op.execute("DROP TRIGGER IF EXISTS jobs_notify ON jobs")
        op.execute("DROP FUNCTION IF EXISTS cq_jobs_notify()")

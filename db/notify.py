"""The jobs' change notifications on PostgreSQL: the channel, the payload, the reads of a listener.

Migration 0006 adds a trigger on ``jobs``: every UPDATE that changes a row's ``status``
or ``completion_tokens`` runs ``pg_notify(NOTIFY_CHANNEL, payload)``, delivered to the
listeners when its transaction commits, with the payload the JSON object
``{"id": "<uuid>", "status": "<status>", "completion_tokens": <int or null>}``.
SQLite sends nothing: its readers poll. See docs/sql.md.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import FINISHED_STATUSES, UNFINISHED_STATUSES, JobRow, JobStatus
from db.queries import owned_by

#: The channel the trigger notifies on: ``LISTEN cq_jobs``.
NOTIFY_CHANNEL = "cq_jobs"


class JobNotice(NamedTuple):
    """One notification: a job's status and tokens as its UPDATE committed them."""

    id: uuid.UUID
    status: JobStatus
    completion_tokens: int | None

    @property
    def finished(self) -> bool:
        """True when the job reached an end state."""
        return self.status in FINISHED_STATUSES


def parse_notice(payload: str) -> JobNotice | None:
    """The notice a payload holds; None for a payload that is not one (sent by someone else)."""
    try:
        data = json.loads(payload)
        tokens = data.get("completion_tokens")
        return JobNotice(
            uuid.UUID(str(data["id"])),
            JobStatus(data["status"]),
            tokens if isinstance(tokens, int) else None,
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def unfinished_ids(
    session: Session, *, job_ids: Sequence[uuid.UUID], tenant: str | None = None
) -> set[uuid.UUID]:
    """Return the ids among ``job_ids`` (of ``tenant``'s, when given) still queued or running."""
    stmt = select(JobRow.id).where(
        JobRow.id.in_(list(job_ids)), JobRow.status.in_(UNFINISHED_STATUSES), *owned_by(tenant)
    )
    return set(session.scalars(stmt))

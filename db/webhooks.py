"""Webhook delivery state on the job row: which deliveries are due, who holds one, how it went.

A delivery is claimed with one guarded UPDATE (the attempt count it expects, and
below the most attempts allowed), so two API processes polling the same database
never POST the same attempt twice, and no webhook is tried more often than allowed,
even when a dispatcher dies between claiming an attempt and recording it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db.models import FINISHED_STATUSES, JobRow, WebhookStatus
from db.snapshots import Job, utcnow


def _due(now: datetime) -> tuple[Any, ...]:
    """Pending webhooks of finished jobs whose retry time or lease has passed at ``now``."""
    return (
        JobRow.webhook_status == WebhookStatus.PENDING,
        JobRow.status.in_(FINISHED_STATUSES),
        or_(JobRow.webhook_next_at.is_(None), JobRow.webhook_next_at <= now),
    )


def due_webhooks(session: Session, *, now: datetime, limit: int = 50) -> list[Job]:
    """Return finished jobs whose webhook is pending and due at ``now``, oldest first."""
    stmt = select(JobRow).where(*_due(now)).order_by(JobRow.finished_at).limit(limit)
    return [Job.from_row(row) for row in session.scalars(stmt)]


def give_up_webhook(
    session: Session, *, job_id: uuid.UUID, now: datetime, max_attempts: int
) -> bool:
    """Fail a due webhook that has no attempt left; False if it has, or is not due.

    That is one whose last attempt was claimed and never recorded: its
    dispatcher died, or lost the database, in the middle of it.
    """
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, *_due(now), JobRow.webhook_attempts >= max_attempts)
        .values(
            webhook_status=WebhookStatus.FAILED,
            webhook_error=func.coalesce(
                JobRow.webhook_error, f"no answer recorded after {max_attempts} attempts"
            ),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def claim_webhook(
    session: Session,
    *,
    job_id: uuid.UUID,
    attempts: int,
    max_attempts: int,
    lease_until: datetime,
) -> bool:
    """Take the next delivery attempt of a pending webhook; False if another process has it.

    The attempt is counted now, only while it is below ``max_attempts``, and the
    job is not due again before ``lease_until``, so a dispatcher that dies
    mid-POST leaves a delivery that is retried later (or given up, when it was
    the last).
    """
    result = session.execute(
        update(JobRow)
        .where(
            JobRow.id == job_id,
            JobRow.webhook_status == WebhookStatus.PENDING,
            JobRow.webhook_attempts == attempts,
            JobRow.webhook_attempts < max_attempts,
        )
        .values(webhook_attempts=attempts + 1, webhook_next_at=lease_until)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_webhook(
    session: Session,
    *,
    job_id: uuid.UUID,
    delivered: bool,
    error: str | None = None,
    retry_at: datetime | None = None,
) -> None:
    """Record how an attempt went: delivered, retried at ``retry_at``, or failed for good."""
    values: dict[str, object]
    if delivered:
        values = {
            "webhook_status": WebhookStatus.DELIVERED,
            "webhook_delivered_at": utcnow(),
            "webhook_error": None,
            "webhook_next_at": None,
        }
    elif retry_at is not None:
        values = {"webhook_error": error, "webhook_next_at": retry_at}
    else:
        values = {"webhook_status": WebhookStatus.FAILED, "webhook_error": error}
    session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.webhook_status == WebhookStatus.PENDING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )

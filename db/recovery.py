"""Transitions for jobs that lost their way: retried too often, stuck running, queued too long
or past their deadline.

Each is one fenced statement, like those of :mod:`db.jobs`: a row changes only
in the state it was read in (status and attempt, :mod:`db.fence`), so a worker
that finishes the job meanwhile, or another reaper, wins or loses cleanly and
nothing is doubled.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from db.fence import Fenced, fenced_update
from db.models import UNFINISHED_STATUSES, BatchRow, JobRow, JobStatus
from db.snapshots import utcnow


@dataclass(frozen=True, slots=True)
class Requeued:
    """A job the reaper put back in the queue: what a new message needs."""

    id: uuid.UUID
    model: str
    priority: int


def fail_attempts(
    session: Session, *, jobs: Sequence[tuple[uuid.UUID, int]], error: dict[str, str]
) -> int:
    """Fail unfinished jobs still at the given ``(id, attempts)``; return how many changed."""
    writes = [Fenced(job_id, attempt, UNFINISHED_STATUSES) for job_id, attempt in jobs]
    now = utcnow()
    return fenced_update(session, writes, status=JobStatus.FAILED, error=error, finished_at=now)


def stuck_jobs(
    session: Session, *, started_before: datetime, limit: int
) -> list[tuple[uuid.UUID, int]]:
    """Return ``(id, attempts)`` of up to ``limit`` jobs running since before ``started_before``."""
    stmt = (
        select(JobRow.id, JobRow.attempts)
        .where(JobRow.status == JobStatus.RUNNING, JobRow.started_at < started_before)
        .order_by(JobRow.started_at)
        .limit(limit)
    )
    return [(job_id, attempts) for job_id, attempts in session.execute(stmt)]


def requeue_jobs(session: Session, *, jobs: Sequence[tuple[uuid.UUID, int]]) -> list[Requeued]:
    """Put running jobs still at the given ``(id, attempts)`` back to queued; return them.

    The caller sends each returned job a new message in the same transaction; a
    late result of the old attempt is then discarded by :func:`db.jobs.finish_jobs`.
    """
    requeued: list[Requeued] = []
    for job_id, attempt in jobs:
        row = session.execute(
            update(JobRow)
            .where(
                JobRow.id == job_id,
                JobRow.attempts == attempt,
                JobRow.status == JobStatus.RUNNING,
            )
            .values(status=JobStatus.QUEUED, started_at=None)
            .returning(JobRow.id, JobRow.model, JobRow.priority)
            .execution_options(synchronize_session=False)
        ).first()
        if row is not None:
            requeued.append(Requeued(id=row.id, model=row.model, priority=row.priority))
    return requeued


def old_queued_jobs(session: Session, *, created_before: datetime, limit: int) -> list[Requeued]:
    """Return up to ``limit`` jobs still queued that were submitted before ``created_before``."""
    stmt = (
        select(JobRow.id, JobRow.model, JobRow.priority)
        .where(JobRow.status == JobStatus.QUEUED, JobRow.created_at < created_before)
        .order_by(JobRow.created_at)
        .limit(limit)
    )
    return [Requeued(id=i, model=m, priority=p) for i, m, p in session.execute(stmt)]


@dataclass(frozen=True, slots=True)
class DeadlineErrors:
    """What a job still queued at its deadline is failed with: a line of an OpenAI-style
    batch (its deadline is the batch's completion window) with ``window``, any other
    job with ``deadline``."""

    deadline: dict[str, str]
    window: dict[str, str]


def fail_past_deadline(
    session: Session,
    *,
    errors: DeadlineErrors,
    job_ids: Sequence[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """Fail the jobs still queued past their deadline (among ``job_ids``, when given); return
    their ids. A job that started in time is left to finish, however long it runs.
    """
    past = [JobRow.status == JobStatus.QUEUED, JobRow.deadline < utcnow()]
    if job_ids is not None:
        past.append(JobRow.id.in_(list(job_ids)))
    in_batch = JobRow.batch_id.in_(select(BatchRow.id))
    return _fail_where(session, errors.window, *past, in_batch) + _fail_where(
        session, errors.deadline, *past, ~in_batch | JobRow.batch_id.is_(None)
    )


def expire_queued_jobs(
    session: Session, *, created_before: datetime, error: dict[str, str]
) -> list[uuid.UUID]:
    """Fail the jobs still queued that were submitted before ``created_before``; return ids."""
    return _fail_where(
        session, error, JobRow.status == JobStatus.QUEUED, JobRow.created_at < created_before
    )


def _fail_where(
    session: Session, error: dict[str, str], *where: ColumnElement[bool]
) -> list[uuid.UUID]:
    """Fail every job matching ``where`` with ``error``; return their ids."""
    stmt = (
        update(JobRow)
        .where(*where)
        .values(status=JobStatus.FAILED, error=error, finished_at=utcnow())
        .returning(JobRow.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(stmt))

"""The reads of jobs that clients, the API and workers make: by id, by prefix, by page, by count.

Reads only: nothing here writes a row (the writes are :mod:`db.jobs`'), and a read
made for a tenant passes it on to :func:`owned_by`, so a tenant sees its own jobs
and no one else's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import UNFINISHED_STATUSES, JobRow, JobStatus
from db.snapshots import Job, JobState, aware


def owned_by(tenant: str | None) -> tuple[Any, ...]:
    """The filter of a tenant's jobs: none for None (the operator sees every job)."""
    return () if tenant is None else (JobRow.tenant == tenant,)


def get_job(session: Session, *, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """Return the job, or None if there is no such id (of ``tenant``'s, when given)."""
    row = session.get(JobRow, job_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None
    return Job.from_row(row)


def get_jobs(
    session: Session, *, job_ids: Sequence[uuid.UUID], tenant: str | None = None
) -> dict[uuid.UUID, Job]:
    """Return the jobs that exist among ``job_ids`` (of ``tenant``'s, when given), by id."""
    rows = session.scalars(select(JobRow).where(JobRow.id.in_(list(job_ids)), *owned_by(tenant)))
    return {row.id: Job.from_row(row) for row in rows}


def get_unfinished_jobs(session: Session, *, job_ids: Sequence[uuid.UUID]) -> list[Job]:
    """Return the queued or running jobs among ``job_ids``, in the order given."""
    rows = session.scalars(
        select(JobRow).where(JobRow.id.in_(list(job_ids)), JobRow.status.in_(UNFINISHED_STATUSES))
    )
    by_id = {row.id: Job.from_row(row) for row in rows}
    return [by_id[i] for i in job_ids if i in by_id]


def job_states(session: Session, *, batch_id: str) -> dict[uuid.UUID, JobState]:
    """Return the status, finish time and error type of every job of ``batch_id``, by id."""
    stmt = select(JobRow.id, JobRow.status, JobRow.finished_at, JobRow.error).where(
        JobRow.batch_id == batch_id
    )
    return {
        job_id: JobState(JobStatus(status), aware(finished), (error or {}).get("type"))
        for job_id, status, finished, error in session.execute(stmt)
    }


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None = None,
    batch_id: str | None = None,
    tenant: str | None = None,
    limit: int = 100,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[Job]:
    """Return up to ``limit`` jobs, newest first, filtered by status, batch and tenant.

    ``after`` is the ``(created_at, id)`` of the last job of the previous page:
    the page starts just after it (keyset pagination, stable under inserts).
    """
    stmt = (
        select(JobRow)
        .where(*owned_by(tenant))
        .order_by(JobRow.created_at.desc(), JobRow.id)
        .limit(limit)
    )
    if after is not None:
        created, job_id = after
        stmt = stmt.where(
            (JobRow.created_at < created) | ((JobRow.created_at == created) & (JobRow.id > job_id))
        )
    if status is not None:
        stmt = stmt.where(JobRow.status == status)
    if batch_id is not None:
        stmt = stmt.where(JobRow.batch_id == batch_id)
    return [Job.from_row(row) for row in session.scalars(stmt)]


def count_queued(session: Session, *, tenant: str | None = None) -> int:
    """Return how many jobs are queued, over every model (of ``tenant``'s, when given)."""
    stmt = select(func.count()).where(JobRow.status == JobStatus.QUEUED, *owned_by(tenant))
    return int(session.scalar(stmt) or 0)


def count_unfinished(
    session: Session, *, job_ids: Sequence[uuid.UUID], tenant: str | None = None
) -> int:
    """Return how many of ``job_ids`` (of ``tenant``'s, when given) are still queued or running."""
    stmt = select(func.count()).where(
        JobRow.id.in_(list(job_ids)), JobRow.status.in_(UNFINISHED_STATUSES), *owned_by(tenant)
    )
    return int(session.scalar(stmt) or 0)


def job_ids_by_prefix(
    session: Session, *, prefix: str, tenant: str | None = None, limit: int = 2
) -> list[uuid.UUID]:
    """Return up to ``limit`` ids that start with the hex digits ``prefix`` (of ``tenant``'s).

    A range on the primary key, so both backends answer from the index.
    """
    low, high = uuid.UUID(prefix.ljust(32, "0")), uuid.UUID(prefix.ljust(32, "f"))
    stmt = (
        select(JobRow.id)
        .where(JobRow.id >= low, JobRow.id <= high, *owned_by(tenant))
        .order_by(JobRow.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def batch_ids_by_prefix(
    session: Session, *, prefix: str, tenant: str | None = None, limit: int = 2
) -> list[str]:
    """Return up to ``limit`` batch ids of jobs that are ``prefix`` or start with it."""
    exact = select(JobRow.batch_id).where(JobRow.batch_id == prefix, *owned_by(tenant)).limit(1)
    if session.scalar(exact) is not None:
        return [prefix]
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    stmt = (
        select(JobRow.batch_id)
        .where(JobRow.batch_id.like(pattern, escape="\\"), *owned_by(tenant))
        .distinct()
        .order_by(JobRow.batch_id)
        .limit(limit)
    )
    return [batch for batch in session.scalars(stmt) if batch is not None]

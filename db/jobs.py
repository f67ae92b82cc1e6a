"""The writes of jobs: their creation, their state transitions, and their pruning.

queued → running → succeeded | failed | cancelled. Every transition is one
statement (or one executemany) guarded by the status it expects, so a late or
duplicate writer changes nothing: a result is written only by the attempt that
currently holds the job (:func:`finish_jobs` writes through :mod:`db.fence`).
The reads are in :mod:`db.queries`.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.fence import Fenced, fenced_update
from db.models import (
    FINISHED_STATUSES,
    UNFINISHED_STATUSES,
    JobRow,
    JobStatus,
    ResponseRow,
    WebhookStatus,
)
from db.queries import get_job, owned_by
from db.snapshots import Finished, Job, NewJob, Outcome, utcnow

_TABLE = cast(Table, JobRow.__table__)


def _insert_ignoring_duplicate_keys(session: Session) -> Any:
    # No conflict target: the keys are unique by two partial indexes (per tenant, and
    # without one), and ids are fresh UUIDs, so any conflict is a known key.
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(_TABLE).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(_TABLE).on_conflict_do_nothing()
    return insert(_TABLE)


def create_jobs(session: Session, *, jobs: Sequence[NewJob]) -> list[tuple[Job, bool]]:
    """Insert ``jobs`` as queued; return each job and whether it is new.

    A job whose idempotency key already exists for its tenant is not inserted:
    the existing job is returned in its place, with ``False``.
    """
    if not jobs:
        return []
    now = utcnow()
    # Strictly increasing times keep a batch's submission order readable back.
    times = [now + timedelta(microseconds=i) for i in range(len(jobs))]
    session.execute(
        _insert_ignoring_duplicate_keys(session),
        [
            {
                "id": job.id,
                "status": JobStatus.QUEUED,
                "model": job.model,
                "prompt": job.prompt,
                "messages": job.messages,
                "params": job.params,
                "attempts": 0,
                "priority": job.priority,
                "idempotency_key": job.idempotency_key,
                "batch_id": job.batch_id,
                "created_at": created_at,
                "callback_url": job.callback_url,
                "webhook_status": WebhookStatus.PENDING if job.callback_url else None,
                "webhook_attempts": 0,
                "tenant": job.tenant,
                "lane": job.lane,
                "deadline": job.deadline,
                "cost_prompt_tokens": job.cost[0] if job.cost else None,
                "cost_new_tokens": job.cost[1] if job.cost else None,
            }
            for job, created_at in zip(jobs, times, strict=True)
        ],
    )
    keys = [job.idempotency_key for job in jobs if job.idempotency_key is not None]
    by_key: dict[tuple[str | None, str], JobRow] = {}
    if keys:
        rows = session.scalars(select(JobRow).where(JobRow.idempotency_key.in_(keys)))
        by_key = {(row.tenant, row.idempotency_key): row for row in rows if row.idempotency_key}
    result: list[tuple[Job, bool]] = []
    for job, created_at in zip(jobs, times, strict=True):
        key = job.idempotency_key
        existing = by_key.get((job.tenant, key)) if key else None
        if existing is not None and existing.id != job.id:
            result.append((Job.from_row(existing), False))
            continue
        snapshot = Job(
            id=job.id,
            status=JobStatus.QUEUED,
            model=job.model,
            prompt=job.prompt,
            params=job.params,
            choices=[],
            prompt_tokens=None,
            completion_tokens=None,
            error=None,
            attempts=0,
            worker=None,
            priority=job.priority,
            idempotency_key=job.idempotency_key,
            batch_id=job.batch_id,
            created_at=created_at,
            started_at=None,
            finished_at=None,
            callback_url=job.callback_url,
            webhook_status=WebhookStatus.PENDING if job.callback_url else None,
            tenant=job.tenant,
            messages=job.messages,
            lane=job.lane,
            deadline=job.deadline,
        )
        result.append((snapshot, True))
    return result


def withdraw_jobs(session: Session, *, job_ids: Iterable[uuid.UUID], error: dict[str, str]) -> None:
    """Take back queued jobs whose messages could not be sent.

    A job without an idempotency key was seen by no one but its submitter, who is
    told it failed: it is deleted. One with a key may have been given meanwhile
    to a concurrent request with the same key, so it stays, failed with
    ``error`` (the id that request holds keeps answering), and its key is
    released so that a retry with it queues the job anew.
    """
    ids = list(job_ids)
    if not ids:
        return
    queued = (JobRow.id.in_(ids), JobRow.status == JobStatus.QUEUED)
    session.execute(delete(JobRow).where(*queued, JobRow.idempotency_key.is_(None)))
    session.execute(
        update(JobRow)
        .where(*queued)
        .values(status=JobStatus.FAILED, error=error, idempotency_key=None, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def claim_jobs(session: Session, *, job_ids: Sequence[uuid.UUID], worker: str) -> list[Job]:
    """Mark the unfinished jobs among ``job_ids`` running (attempts + 1); return them.

    Finished and cancelled jobs are left alone and not returned: a redelivered
    message of a finished job changes nothing. Nor is a job still queued past its
    deadline: it must never run (:func:`db.recovery.fail_past_deadline` fails it).
    """
    now = utcnow()
    in_time = or_(
        JobRow.status == JobStatus.RUNNING, JobRow.deadline.is_(None), JobRow.deadline >= now
    )
    stmt = (
        update(JobRow)
        .where(JobRow.id.in_(list(job_ids)), JobRow.status.in_(UNFINISHED_STATUSES), in_time)
        .values(
            status=JobStatus.RUNNING,
            attempts=JobRow.attempts + 1,
            worker=worker,
            started_at=now,
        )
        .returning(JobRow)
        .execution_options(synchronize_session=False)
    )
    return [Job.from_row(row) for row in session.scalars(stmt)]


def finish_jobs(session: Session, *, outcomes: Sequence[Outcome]) -> Finished:
    """Write the outcomes of one batch in one executemany; say how many rows changed.

    A row changes only if it is still running under the same attempt: a job that
    was cancelled, or claimed again by a later delivery, keeps its state. An
    outcome of status cancelled (the worker stopped the job's rows when it saw the
    cancel) records the tokens generated up to then, on a row still cancelled under
    that attempt. A job cancelled after the worker's last look (its rows had
    finished, or the cancel came between two progress checks) keeps what it
    generated the same way, each choice with the finish reason it ended on (the
    cancel cut none of them), and is named in ``cancelled_late``: a select of the
    missed rows and a second executemany, run only when the first missed rows.
    """
    if not outcomes:
        return Finished(0)
    now = utcnow()
    changed = fenced_update(session, [_outcome_write(o) for o in outcomes], finished_at=now)
    succeeded = {o.job_id: o for o in outcomes if o.status is JobStatus.SUCCEEDED}
    if changed == len(outcomes) or not succeeded:
        return Finished(changed)
    rows = session.connection().execute(
        select(_TABLE.c.id, _TABLE.c.attempts).where(
            _TABLE.c.id.in_(list(succeeded)), _TABLE.c.status == JobStatus.CANCELLED
        )
    )
    late = [
        replace(succeeded[job_id], status=JobStatus.CANCELLED)
        for job_id, attempt in rows
        if succeeded[job_id].attempt == attempt
    ]
    if not late:
        return Finished(changed)
    changed += fenced_update(session, [_outcome_write(o) for o in late], finished_at=now)
    return Finished(changed, frozenset(o.job_id for o in late))


def _outcome_write(o: Outcome) -> Fenced:
    """One outcome as a fenced write: over its running row, or its cancelled one for a cancel."""
    return Fenced(
        job_id=o.job_id,
        attempt=o.attempt,
        expect=o.status if o.status is JobStatus.CANCELLED else JobStatus.RUNNING,
        values={
            "status": o.status,
            "choices": [c.to_dict() for c in o.choices] if o.choices else None,
            "prompt_tokens": o.prompt_tokens,
            "truncated_prompt_tokens": o.truncated_prompt_tokens,
            "completion_tokens": o.completion_tokens if o.choices else None,
            "error": o.error,
        },
    )


def cancel_jobs(
    session: Session, *, job_ids: Sequence[uuid.UUID], tenant: str | None = None
) -> int:
    """Cancel the queued or running jobs among ``job_ids``; return how many changed."""
    result = session.execute(
        update(JobRow)
        .where(
            JobRow.id.in_(list(job_ids)),
            JobRow.status.in_(UNFINISHED_STATUSES),
            *owned_by(tenant),
        )
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return max(int(result.rowcount), 0)  # type: ignore[attr-defined]


def cancel_job(session: Session, *, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """Cancel a queued or running job; return its row, or None if there is no such id.

    A queued job will never run; a running one is stopped by its worker at its next
    progress check, which records the tokens generated up to then (fenced on the
    cancelled status: :func:`finish_jobs` never writes a result over a cancel).
    """
    cancel_jobs(session, job_ids=[job_id], tenant=tenant)
    return get_job(session, job_id=job_id, tenant=tenant)


def prune_jobs(
    session: Session,
    *,
    finished_before: datetime,
    statuses: Collection[JobStatus] = FINISHED_STATUSES,
    limit: int = 10_000,
) -> int:
    """Delete up to ``limit`` jobs of ``statuses`` finished before ``finished_before``.

    Returns how many rows went; call again (in a new transaction) until it returns 0,
    so that a large prune never holds one long lock. Unfinished jobs are never pruned.
    """
    unfinished = set(statuses) - FINISHED_STATUSES
    if unfinished:
        names = ", ".join(sorted(s.value for s in unfinished))
        raise ValueError(f"only finished jobs can be pruned, not {names}")
    oldest = list(
        session.scalars(
            select(JobRow.id)
            .where(JobRow.status.in_(list(statuses)), JobRow.finished_at < finished_before)
            .limit(limit)
        )
    )
    if not oldest:
        return 0
    # A response is its job's: it goes with it.
    session.execute(delete(ResponseRow).where(ResponseRow.id.in_(oldest)))
    result = session.execute(
        delete(JobRow).where(JobRow.id.in_(oldest)).execution_options(synchronize_session=False)
    )
    return max(int(getattr(result, "rowcount", 0) or 0), 0)

"""Read-only aggregates over the jobs table, for `cq stats` and metrics collectors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import FINISHED_STATUSES, JobRow, JobStatus
from db.snapshots import aware


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """The timings of one finished job, without its prompt or texts."""

    status: JobStatus
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime
    completion_tokens: int

    @property
    def latency_s(self) -> float:
        """Seconds from submit to the finished row."""
        return (self.finished_at - self.created_at).total_seconds()


def count_by_status(session: Session) -> dict[JobStatus, int]:
    """Return how many jobs are in each status (every status present, zeros included)."""
    rows = session.execute(select(JobRow.status, func.count()).group_by(JobRow.status))
    counts = dict.fromkeys(JobStatus, 0)
    for status, count in rows:
        counts[JobStatus(status)] = int(count)
    return counts


def finished_since(session: Session, *, since: datetime) -> list[FinishedJob]:
    """Return the timings of every job that finished at or after ``since``."""
    stmt = select(
        JobRow.status,
        JobRow.model,
        JobRow.created_at,
        JobRow.started_at,
        JobRow.finished_at,
        JobRow.completion_tokens,
    ).where(JobRow.status.in_(FINISHED_STATUSES), JobRow.finished_at >= since)
    result: list[FinishedJob] = []
    for status, model, created, started, finished, tokens in session.execute(stmt):
        created_at, finished_at = aware(created), aware(finished)
        assert created_at is not None and finished_at is not None
        result.append(
            FinishedJob(
                status=JobStatus(status),
                model=model,
                created_at=created_at,
                started_at=aware(started),
                finished_at=finished_at,
                completion_tokens=int(tokens or 0),
            )
        )
    return result


def queued_models(session: Session) -> list[str]:
    """Return the models that have queued jobs, sorted."""
    stmt = select(JobRow.model).where(JobRow.status == JobStatus.QUEUED).distinct()
    return sorted(session.scalars(stmt))


@dataclass(frozen=True, slots=True)
class Load:
    """The unfinished jobs of one model, tenant and status, with their estimated tokens."""

    model: str
    tenant: str | None
    status: JobStatus
    jobs: int
    #: Sum of the jobs' estimated prompt tokens (``jobs.cost_prompt_tokens``).
    prompt_tokens: int
    #: Sum of the most new tokens the jobs may generate (``jobs.cost_new_tokens``).
    new_tokens: int


def unfinished_load(session: Session) -> list[Load]:
    """Return the queued and running jobs per model and tenant, with their estimated tokens.

    One grouped scan of ``ix_jobs_backlog`` (it holds every column read), so it stays cheap
    at a hundred thousand queued rows; a row without an estimate counts no tokens.
    """
    stmt = (
        select(
            JobRow.model,
            JobRow.tenant,
            JobRow.status,
            func.count(),
            func.coalesce(func.sum(JobRow.cost_prompt_tokens), 0),
            func.coalesce(func.sum(JobRow.cost_new_tokens), 0),
        )
        .where(JobRow.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
        .group_by(JobRow.model, JobRow.tenant, JobRow.status)
    )
    return [
        Load(model, tenant, JobStatus(status), int(jobs), int(prompt or 0), int(new or 0))
        for model, tenant, status, jobs, prompt, new in session.execute(stmt)
    ]


@dataclass(frozen=True, slots=True)
class Served:
    """What one worker served one tenant of one model since a time: finished jobs' tokens."""

    model: str
    tenant: str | None
    #: The worker that ran the jobs; None for jobs that never ran (cancelled while queued).
    worker: str | None
    jobs: int
    #: Prompt plus completion tokens of those jobs.
    tokens: int
    first_started_at: datetime | None
    last_finished_at: datetime


def served_since(session: Session, *, since: datetime) -> list[Served]:
    """Return the tokens of the jobs finished at or after ``since``, per model, tenant and
    worker, with when the worker started the first of them and finished the last."""
    tokens = func.coalesce(JobRow.prompt_tokens, 0) + func.coalesce(JobRow.completion_tokens, 0)
    stmt = (
        select(
            JobRow.model,
            JobRow.tenant,
            JobRow.worker,
            func.count(),
            func.coalesce(func.sum(tokens), 0),
            func.min(JobRow.started_at),
            func.max(JobRow.finished_at),
        )
        .where(JobRow.finished_at >= since, JobRow.status.in_(FINISHED_STATUSES))
        .group_by(JobRow.model, JobRow.tenant, JobRow.worker)
    )
    result = []
    for model, tenant, worker, jobs, total, first, last in session.execute(stmt):
        finished_at = aware(last)
        assert finished_at is not None
        result.append(
            Served(model, tenant, worker, int(jobs), int(total), aware(first), finished_at)
        )
    return result

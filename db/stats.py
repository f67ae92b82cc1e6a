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

"""Partial output while jobs run, and which of them a worker no longer holds.

A worker refreshes the rows of the jobs it is generating with the text so far:
one executemany per refresh, fenced like the final write (``status = running AND
attempts = n``), so a late refresh never overwrites a result, a cancel, or
another attempt. Rows the fence missed are the ones to stop generating.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from db.models import JobRow, JobStatus

_TABLE = cast(Table, JobRow.__table__)


@dataclass(frozen=True, slots=True)
class Progress:
    """One running job's output so far: a partial choice per choice index."""

    job_id: uuid.UUID
    attempt: int
    #: ``{"text", "finish_reason": None, "completion_tokens"}`` per choice.
    choices: list[dict[str, Any]]

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far over all choices."""
        return sum(int(c["completion_tokens"]) for c in self.choices)


def write_progress(
    session: Session, *, progress: Sequence[Progress], status: JobStatus = JobStatus.RUNNING
) -> int:
    """Show each job's output so far in its row; return how many rows changed.

    A row changes only while it has ``status`` under the same attempt: running,
    or cancelled for the tokens a cancelled job kept when its rows stopped.
    """
    if not progress:
        return 0
    stmt = (
        update(_TABLE)
        .where(
            _TABLE.c.id == bindparam("b_id"),
            _TABLE.c.attempts == bindparam("b_attempt"),
            _TABLE.c.status == status,
        )
        .values(choices=bindparam("b_choices"), completion_tokens=bindparam("b_tokens"))
    )
    result = session.connection().execute(
        stmt,
        [
            {
                "b_id": p.job_id,
                "b_attempt": p.attempt,
                "b_choices": p.choices,
                "b_tokens": p.completion_tokens,
            }
            for p in progress
        ],
    )
    return max(result.rowcount, 0)


def lost_jobs(session: Session, *, held: Sequence[tuple[uuid.UUID, int]]) -> set[uuid.UUID]:
    """Return the ids among ``held`` (id, attempt) that are no longer running under that attempt.

    They were cancelled, finished, or claimed again by a later delivery: the worker
    holding the old attempt stops generating them.
    """
    if not held:
        return set()
    attempts = dict(held)
    rows = session.execute(
        select(JobRow.id, JobRow.status, JobRow.attempts).where(JobRow.id.in_(list(attempts)))
    )
    still = {
        job_id
        for job_id, status, attempt in rows
        if status == JobStatus.RUNNING and attempt == attempts[job_id]
    }
    return set(attempts) - still

"""Partial output while jobs run, and which of them a worker no longer holds.

A worker refreshes the rows of the jobs it is generating with the text so far:
one executemany per refresh, fenced like the final write (``status = running AND
attempts = n``, :mod:`db.fence`), so a late refresh never overwrites a result, a
cancel, or another attempt. Rows the fence missed are the ones to stop generating.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.fence import Fenced, fenced_update
from db.models import JobRow, JobStatus


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
    return fenced_update(
        session,
        [
            Fenced(
                job_id=p.job_id,
                attempt=p.attempt,
                expect=status,
                values={"choices": p.choices, "completion_tokens": p.completion_tokens},
            )
            for p in progress
        ],
    )


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

"""The fence on a write by the holder of a job's attempt: ``id, attempts, status`` as read.

A worker or the reaper reads a job at some attempt and status, then writes back
what it decided. The write lands only if the row is still there, so a late,
duplicate or superseded writer changes nothing: a cancel, a result, or a later
attempt's claim is never overwritten. Every such write is one executemany of
:func:`fenced_update`: ``UPDATE jobs ... WHERE id = :id AND attempts = :n AND
status = :s``, whose rowcount says how many rows the fence let through.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import BindParameter, ColumnElement, Table, bindparam, update
from sqlalchemy.orm import Session

from db.models import JobRow, JobStatus

_TABLE = cast(Table, JobRow.__table__)


@dataclass(frozen=True, slots=True)
class Fenced:
    """One row's write: ``values`` land only while the row is at ``attempt`` in ``expect``."""

    job_id: uuid.UUID
    attempt: int
    #: The status the writer left the row in, or the statuses any of which will do.
    expect: JobStatus | Collection[JobStatus]
    #: Column values of this row alone (each write of one call names the same columns).
    values: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.expected():
            raise ValueError(f"a fenced write of job {self.job_id} must expect a status")

    def expected(self) -> tuple[JobStatus, ...]:
        """The statuses the row may be in, as a tuple."""
        if isinstance(self.expect, JobStatus):
            return (self.expect,)
        return tuple(self.expect)


def fenced_update(session: Session, writes: Sequence[Fenced], **values: Any) -> int:
    """Apply ``writes`` in one executemany; return how many rows changed.

    ``values`` are set on every row the fence lets through, beside each write's own.
    """
    if not writes:
        return 0
    columns = writes[0].values.keys()
    if any(write.values.keys() != columns for write in writes):
        raise ValueError("every fenced write of one update must set the same columns")
    # Bound names differ from the column names: SQLAlchemy reserves those for the SET clause.
    per_row: dict[str, BindParameter[Any]] = {c: bindparam(f"v_{c}") for c in columns}
    # One bound slot per expected status, as many as the widest write needs; a write
    # expecting fewer repeats its last, so each row is fenced on its own statuses.
    width = max(len(write.expected()) for write in writes)
    stmt = (
        update(_TABLE)
        .where(
            _TABLE.c.id == bindparam("f_id"),
            _TABLE.c.attempts == bindparam("f_attempt"),
            _status_in(width),
        )
        .values(**per_row, **values)
    )
    params = [_params(write, width) for write in writes]
    return max(session.connection().execute(stmt, params).rowcount, 0)


def _status_in(width: int) -> ColumnElement[bool]:
    """The status guard with ``width`` bound slots."""
    status = _TABLE.c.status
    slots = [bindparam(f"f_status_{i}", type_=status.type) for i in range(width)]
    return status == slots[0] if width == 1 else status.in_(slots)


def _params(write: Fenced, width: int) -> dict[str, Any]:
    """The bound values of one write: its fence, then its own column values."""
    expected = write.expected()
    slots = {f"f_status_{i}": expected[min(i, len(expected) - 1)] for i in range(width)}
    own = {f"v_{column}": value for column, value in write.values.items()}
    return {"f_id": write.job_id, "f_attempt": write.attempt, **slots, **own}

"""A job's lane and deadline as a caller gives them: checked before anything is written.

A lane is ``interactive`` (a caller waits for the answer: the default) or ``batch``
(batch lines, ``cq submit --file``); interactive work goes ahead of batch lines. A
deadline is when the job must have started by: a time with a zone (a ``datetime``
or an ISO-8601 string), or a number of seconds from now; a job still queued then
fails with ``DeadlineExceeded`` without running.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from completion_queue import ValidationError
from db import LANES, utcnow

#: The furthest deadline accepted: past it, a job would outlive any queue worth waiting in.
MAX_DEADLINE = timedelta(days=30)


def check_lane(value: Any) -> str:
    """Return ``value`` if it is a lane; else raise ValueError saying what it must be."""
    if value not in LANES:
        names = " or ".join(repr(lane) for lane in LANES)
        raise ValueError(f"must be {names}, got {value!r}")
    return str(value)


def parse_deadline(value: Any, *, now: datetime | None = None) -> datetime:
    """Return the deadline ``value`` gives as a UTC time within ``MAX_DEADLINE`` of ``now``.

    Args:
        value: a timezone-aware ``datetime``, an ISO-8601 string with a zone, or a
            number of seconds from ``now`` (above 0).
        now: the time seconds count from; the current time when omitted.

    Raises:
        ValueError: ``value`` is none of those, has no zone, is not in the future, or is
            more than ``MAX_DEADLINE`` away; the message says which, without the field name.
    """
    now = now or utcnow()
    if isinstance(value, bool):
        raise ValueError(f"must be a time or a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"must be a number of seconds above 0, got {value!r}")
        if value > MAX_DEADLINE.total_seconds():
            raise ValueError(f"must be at most {_bound()} from now, got {value:g} s")
        return now + timedelta(seconds=value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"must be an ISO-8601 time with a zone or a number of seconds, got {value!r}"
            ) from None
    if not isinstance(value, datetime):
        raise ValueError(f"must be a time or a number of seconds, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"must carry a timezone (e.g. 2030-01-01T12:00:00Z), got {value}")
    when = value.astimezone(UTC)
    if when <= now:
        raise ValueError(f"must be in the future, got {when.isoformat()}")
    if when > now + MAX_DEADLINE:
        raise ValueError(f"must be at most {_bound()} from now, got {when.isoformat()}")
    return when


def resolve_deadline(value: Any, *, now: datetime | None = None) -> datetime:
    """:func:`parse_deadline`, raising :class:`ValidationError` naming ``deadline``."""
    try:
        return parse_deadline(value, now=now)
    except ValueError as exc:
        raise ValidationError(f"deadline {exc}", field="deadline") from None


def resolve_lane(value: Any) -> str:
    """:func:`check_lane`, raising :class:`ValidationError` naming ``lane``."""
    try:
        return check_lane(value)
    except ValueError as exc:
        raise ValidationError(f"lane {exc}", field="lane") from None


def _bound() -> str:
    return f"{MAX_DEADLINE.days} days"

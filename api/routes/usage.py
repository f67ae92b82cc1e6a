"""``GET /v1/usage``: the caller's jobs and tokens per model and day, from the job rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.state import CallerDep
from completion_queue import ValidationError
from db import usage, utcnow

router = APIRouter(prefix="/v1", tags=["usage"])

#: The span of a usage query without ``start``.
DEFAULT_SPAN = timedelta(days=7)


def moment(value: str, field: str) -> datetime:
    """An ISO 8601 date (midnight UTC) or date-time (UTC when it names no zone)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"{field} must be an ISO 8601 date or date-time, got {value!r}", field=field
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("/usage")
def get_usage(
    caller: CallerDep,
    start: Annotated[str | None, Query(max_length=40, description="From (ISO 8601).")] = None,
    end: Annotated[str | None, Query(max_length=40, description="Until, excluded.")] = None,
) -> dict[str, Any]:
    """Jobs, prompt and completion tokens per model and day (UTC) of the jobs finished in
    ``[start, end)`` (default: the last 7 days): the caller's own."""
    until = moment(end, "end") if end else utcnow()
    since = moment(start, "start") if start else until - DEFAULT_SPAN
    if since >= until:
        raise ValidationError("start must be before end", field="start")
    with caller.client.sessions() as session:
        rows = usage(session, start=since, end=until, tenant=caller.name)
    return {
        "object": "list",
        "start": since.isoformat(),
        "end": until.isoformat(),
        "data": [
            {
                "day": row.day.isoformat(),
                "tenant": row.tenant,
                "model": row.model,
                "jobs": row.jobs,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
            }
            for row in rows
        ],
    }

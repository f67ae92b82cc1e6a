"""Native async jobs over HTTP: submit one or many, read, follow as they generate, list page by
page, cancel."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.errors import APIError, not_found
from api.requests import read_json
from api.state import CallerDep, State
from api.streaming import EventStream, job_events
from api.views import ErrorInfo, job_view
from completion_queue import ValidationError
from db import Job, JobStatus
from producer.schema import CompletionRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_REQUEST_SCHEMA = CompletionRequest.model_json_schema()
_JOBS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"anyOf": [_REQUEST_SCHEMA, {"type": "array", "items": _REQUEST_SCHEMA}]}
        }
    },
}


def job_id_or_404(value: str) -> uuid.UUID:
    """Return ``value`` as a job id; an id that is not a UUID cannot exist (404)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise not_found("job", value) from None


def with_idempotency_key(items: list[Any], key: str | None) -> list[Any]:
    """Give the ``Idempotency-Key`` header to the requests (``key:i`` for item ``i`` of a list)."""
    if key is None:
        return items
    keyed = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            keyed.append(item)
            continue
        own = key if len(items) == 1 else f"{key}:{index}"
        if item.get("idempotency_key", own) != own:
            raise ValidationError(
                "idempotency_key in the body differs from the Idempotency-Key header",
                field="idempotency_key",
            )
        keyed.append({**item, "idempotency_key": own})
    return keyed


def require_webhook_secret(state: State, items: list[Any]) -> None:
    """Refuse callback URLs when no webhook secret is configured to sign their bodies."""
    if state.settings.webhook_secret:
        return
    if any(isinstance(item, dict) and item.get("callback_url") for item in items):
        raise ValidationError(
            "callback_url needs a webhook secret: set CQ_WEBHOOK_SECRET on the API",
            field="callback_url",
        )


@router.post("", status_code=202, openapi_extra={"requestBody": _JOBS_BODY})
async def submit_jobs(
    request: Request,
    state: State,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Queue one request, or a list of them (one batch id): 202 with the job ids."""
    body = await read_json(request)
    single = not isinstance(body, list)
    items = with_idempotency_key([body] if single else body, idempotency_key)
    require_webhook_secret(state, items)
    batch_id = None if single else uuid.uuid4().hex
    client = caller.client

    jobs = await run_in_threadpool(client.submit_many, items, batch_id=batch_id)
    content = {"object": "list", "ids": [str(job.id) for job in jobs], "batch_id": batch_id}
    headers = {"Location": f"/v1/jobs/{jobs[0].id}"} if single and jobs else None
    return JSONResponse(content, status_code=202, headers=headers)


@router.get("/{job_id}")
def get_job(job_id: str, caller: CallerDep) -> dict[str, Any]:
    """One job: status, choices, usage, error, timings and webhook delivery."""
    return job_view(caller.client.get(job_id_or_404(job_id)))


@router.get(
    "/{job_id}/events",
    response_class=EventStream,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events_stream(job_id: str, caller: CallerDep) -> EventStream:
    """Server-Sent Events of one job: ``delta`` (``{"choice", "text"}``) as it generates
    (everything so far first), then ``end`` with the job as ``GET /v1/jobs/{id}`` shows it.

    Every step of a job submitted with ``stream: true``; every progress refresh of others.
    """
    job = await run_in_threadpool(caller.client.get, job_id_or_404(job_id))
    return EventStream(job_events(caller.client, job.id))


def encode_cursor(job: Job) -> str:
    """Return the opaque cursor that continues a listing after ``job``."""
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Return the (created_at, id) a cursor holds; a malformed one is a 400."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationError(
            "cursor is not one this API returned as next_cursor", field="cursor"
        ) from None


@router.get("")
def list_jobs(
    state: State,
    caller: CallerDep,
    status: JobStatus | None = None,
    batch_id: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """Jobs, newest first, a page at a time: pass ``next_cursor`` back as ``cursor``."""
    page = min(limit or state.settings.api_page_size, state.settings.api_page_size)
    after = decode_cursor(cursor) if cursor else None
    jobs = caller.client.list(status=status, batch_id=batch_id, limit=page + 1, after=after)
    has_more = len(jobs) > page
    jobs = jobs[:page]
    return {
        "object": "list",
        "data": [job_view(job) for job in jobs],
        "has_more": has_more,
        "next_cursor": encode_cursor(jobs[-1]) if has_more else None,
    }


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, caller: CallerDep) -> dict[str, Any]:
    """Cancel a queued or running job; a job that already succeeded or failed is a 409."""
    client = caller.client
    job = client.get(job_id_or_404(job_id))
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise APIError(
            ErrorInfo(409, f"job {job.id} already {job.status.value}", code="job_finished")
        )
    return job_view(client.cancel(job.id))

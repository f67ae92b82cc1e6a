"""``/v1/responses``: OpenAI's Responses API over chat jobs: create (waiting for the job, in the
background, or streamed as typed events), retrieve, cancel, delete, list the input items.

A response is its job (``resp_`` and the job id's hex; ``cq get`` takes the job id)
and a row of what the job does not hold (see :mod:`api.responses`). Another tenant's
response is a 404, as an unknown one is.
"""

from __future__ import annotations

import functools
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from api.openai import finished_completion, submit_completions
from api.requests import json_body, read_json
from api.response_view import input_item_views, response_events, response_view
from api.responses import ResponseCall, ResponsesBody, conversation, job_id_of, response_call
from api.routes.files import cursor_page, page_limit
from api.routes.jobs import require_webhook_secret
from api.shapes import CHAT_COMPLETION
from api.state import CallerDep, State
from api.streaming import EventStream, start_streamed
from api.views import ErrorInfo, job_failure
from completion_queue import ValidationError
from db import (
    FINISHED_STATUSES,
    Job,
    JobStatus,
    StoredResponse,
    create_response,
    delete_response,
    get_job,
    get_response,
)
from producer import CompletionClient

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/responses", tags=["openai"])


def response_or_404(
    client: CompletionClient, value: str, *, param: str = "id"
) -> tuple[Job, StoredResponse]:
    """Return the caller's response ``value`` names and its job; any other id is a 404."""
    job_id = job_id_of(value)
    found: tuple[Job | None, StoredResponse | None] = (None, None)
    if job_id is not None:
        with client.sessions() as session:
            found = (
                get_job(session, job_id=job_id, tenant=client.tenant),
                get_response(session, response_id=job_id, tenant=client.tenant),
            )
    job, stored = found
    if job is None or stored is None:
        raise not_found("response", value, param=param)
    return job, stored


def _continue(client: CompletionClient, call: ResponseCall) -> ResponseCall:
    if call.previous_response_id is None:
        return call
    job, stored = response_or_404(client, call.previous_response_id, param="previous_response_id")
    return call.continued(conversation(job, stored), client.limits)


@router.post("", response_model=None, openapi_extra=json_body(ResponsesBody))
async def create_response_route(
    request: Request, state: State, caller: CallerDep
) -> dict[str, Any] | EventStream:
    """Queue the input as one chat job; answer the response once it ends, at once with
    ``background: true`` (status ``queued``), or as typed events with ``stream: true``."""
    body = await read_json(request)
    client = caller.client
    call = response_call(body, client.limits, streaming=True)
    require_webhook_secret(state, [call.request])
    call = await run_in_threadpool(_continue, client, call)
    await run_in_threadpool(CHAT_COMPLETION.check, client, [call.request])

    def store(session: Session, jobs: list[Job]) -> None:
        # In the job's own transaction: the response and its job are written together.
        create_response(session, response=call.stored(jobs[0].id), tenant=caller.name)

    if call.stream:
        streamed = await start_streamed(state, caller, [call.request], in_transaction=store)
        _log_user(call, streamed.jobs[0])
        stored = call.stored(streamed.jobs[0].id)
        return EventStream(response_events(streamed, stored), streamed.close)
    submit = functools.partial(submit_completions, in_transaction=store)
    if call.background:
        jobs = await run_in_threadpool(submit, client, [call.request])
        _log_user(call, jobs[0])
        return response_view(jobs[0], call.stored(jobs[0].id))
    with state.wait_slot(caller.name):
        jobs = await run_in_threadpool(submit, client, [call.request])
        _log_user(call, jobs[0])
        jobs = await finished_completion(client, jobs, state.settings.api_wait_timeout_s, request)
    job = jobs[0]
    failure = job_failure(job)
    if failure is not None and job.status is JobStatus.FAILED:
        raise APIError(failure)
    return response_view(job, call.stored(job.id))


def _log_user(call: ResponseCall, job: Job) -> None:
    if call.user is not None or call.metadata:
        log.info("response for user %r (metadata %r): job %s", call.user, call.metadata, job.id)


@router.get("/{response_id}")
def retrieve_response(
    response_id: str,
    caller: CallerDep,
    stream: bool | None = None,
    include: Annotated[list[str] | None, Query()] = None,
) -> dict[str, Any]:
    """The response as it stands: queued, in progress (its text so far), or ended."""
    if stream:
        raise ValidationError(
            "stream is not supported on retrieve: follow GET /v1/jobs/{id}/events", field="stream"
        )
    if include:
        raise ValidationError("include is not supported", field="include")
    return response_view(*response_or_404(caller.client, response_id))


@router.post("/{response_id}/cancel")
def cancel_response(response_id: str, caller: CallerDep) -> dict[str, Any]:
    """Cancel a queued or running response (a running one keeps its text so far); one that
    completed or failed is a 409, one cancelled already is answered as it is."""
    client = caller.client
    job, stored = response_or_404(client, response_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise APIError(
            ErrorInfo(
                409,
                f"response {response_id} already {response_view(job, stored)['status']}",
                code="response_finished",
            )
        )
    return response_view(client.cancel(job.id), stored)


@router.delete("/{response_id}")
def delete_response_route(response_id: str, caller: CallerDep) -> dict[str, Any]:
    """Delete the response and its job (an unfinished one is cancelled first)."""
    client = caller.client
    job, _ = response_or_404(client, response_id)
    if job.status not in FINISHED_STATUSES:
        client.cancel(job.id)
    with client.sessions.begin() as session:
        delete_response(session, response_id=job.id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/{response_id}/input_items")
def list_input_items(
    response_id: str,
    caller: CallerDep,
    after: Annotated[str | None, Query(max_length=128, description="An item id.")] = None,
    limit: Annotated[int | None, Query(description="1 to 100; 20 without one.")] = None,
    order: Annotated[str, Query(description="asc, or desc (the last first).")] = "desc",
    include: Annotated[list[str] | None, Query()] = None,
) -> dict[str, Any]:
    """The items given as the response's input (not those of the response it continues)."""
    size = page_limit(limit, default=20, most=100)
    if order not in ("asc", "desc"):
        raise ValidationError(f"order must be asc or desc, got {order!r}", field="order")
    if include:
        raise ValidationError("include is not supported", field="include")
    items = input_item_views(*response_or_404(caller.client, response_id))
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ValidationError(
                f"after must be the id of one of the response's input items, got {after!r}",
                field="after",
            )
        start = ids.index(after) + 1
    return cursor_page(items[start : start + size], has_more=len(items) > start + size)

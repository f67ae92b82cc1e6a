"""``/v1/batches``: run every line of an uploaded file as one batch of jobs; read or cancel it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from api.batch_output import (
    CHUNK,
    ENDPOINTS,
    WINDOW,
    batch_or_404,
    batch_view,
    parse_input,
)
from api.errors import APIError, not_found
from api.openai import submit_completions
from api.responses import ResponseCall
from api.routes.files import cursor_page, page_limit
from api.state import CallerDep
from api.views import ErrorInfo
from completion_queue import BrokerUnavailable, ValidationError
from db import (
    BATCH_WINDOW,
    LANE_BATCH,
    Batch,
    Job,
    cancel_jobs,
    create_batch,
    create_response,
    delete_batch,
    get_file_content,
    list_batches,
    mark_batch_cancelled,
    new_id,
    utcnow,
)

router = APIRouter(prefix="/v1", tags=["batches"])


class BatchBody(BaseModel):
    """``POST /v1/batches``: run every line of an uploaded JSONL file."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(description=f"{' or '.join(ENDPOINTS)}: every line's url.")
    completion_window: str = Field(description=f"Only {WINDOW}.")
    metadata: dict[str, str] | None = Field(
        default=None, description="At most 16 pairs: keys of 64, values of 512 characters."
    )

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's bounds on metadata.
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError(f"must have at most 16 pairs, got {len(value)}")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError(
                    f"keys must have at most 64 and values 512 characters ({key[:64]!r})"
                )
        return value


@router.post("/batches")
def create_batch_route(body: BatchBody, caller: CallerDep) -> dict[str, Any]:
    """Validate every line of the input file, queue them all as one batch."""
    if body.endpoint not in ENDPOINTS:
        raise ValidationError(
            f"endpoint must be {' or '.join(ENDPOINTS)}, got {body.endpoint!r}", field="endpoint"
        )
    if body.completion_window != WINDOW:
        raise ValidationError(
            f"completion_window must be {WINDOW}, got {body.completion_window!r}",
            field="completion_window",
        )
    client = caller.client
    with client.sessions() as session:
        content = get_file_content(session, file_id=body.input_file_id, tenant=caller.name)
    if content is None:
        raise not_found("file", body.input_file_id, param="input_file_id")
    responses: list[ResponseCall] = []
    lines = parse_input(
        content, client.limits, client.settings.max_batch_requests, body.endpoint, responses
    )
    batch_id = new_id("batch_")
    requests = [request for _, line in lines for request in line]
    # The completion window is its lines' deadline: a line not started by then expires.
    created_at = utcnow()
    batches: list[Batch] = []

    def store_batch(session: Session, jobs: list[Job]) -> None:
        # In the jobs' own transaction: the batch and its jobs are written together.
        each = iter(jobs)
        grouped = [(custom_id, [next(each).id for _ in line]) for custom_id, line in lines]
        batch = create_batch(
            session,
            batch_id=batch_id,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=WINDOW,
            metadata=body.metadata,
            requests=grouped,
            tenant=caller.name,
            created_at=created_at,
        )
        batches.append(batch)
        if responses:
            # A /v1/responses line's job is a response: retrieved by its id like any.
            for job, call in zip(jobs, responses, strict=True):
                create_response(session, response=call.stored(job.id), tenant=caller.name)

    try:
        submit_completions(
            client,
            requests,
            batch_id=batch_id,
            in_transaction=store_batch,
            lane=LANE_BATCH,
            deadline=created_at + BATCH_WINDOW,
        )
    except BrokerUnavailable:
        with client.sessions.begin() as session:
            delete_batch(session, batch_id=batch_id)  # its jobs were taken back
        raise
    return batch_view(client.sessions, batches[0])


@router.get("/batches/{batch_id}")
def retrieve_batch(batch_id: str, caller: CallerDep) -> dict[str, Any]:
    """A batch: status, request counts and, once done, its output and error files."""
    sessions = caller.client.sessions
    return batch_view(sessions, batch_or_404(sessions, batch_id, tenant=caller.name))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, caller: CallerDep) -> dict[str, Any]:
    """Cancel a batch's unfinished jobs (running ones stop and keep their tokens so far)."""
    sessions = caller.client.sessions
    batch = batch_or_404(sessions, batch_id, tenant=caller.name)
    view = batch_view(sessions, batch)
    if view["status"] in ("completed", "expired"):
        raise APIError(
            ErrorInfo(409, f"batch {batch_id} is already {view['status']}", code="batch_done")
        )
    with sessions.begin() as session:
        mark_batch_cancelled(session, batch_id=batch_id)
        ids = batch.job_ids
        for start in range(0, len(ids), CHUNK):
            cancel_jobs(session, job_ids=ids[start : start + CHUNK], tenant=caller.name)
    return batch_view(sessions, batch_or_404(sessions, batch_id, tenant=caller.name))


@router.get("/batches")
def list_batches_route(
    caller: CallerDep,
    after: Annotated[str | None, Query(max_length=64, description="A batch id.")] = None,
    limit: Annotated[int | None, Query(description="1 to 100; 20 without one.")] = None,
) -> dict[str, Any]:
    """Batches, newest first, a page at a time: pass the last id back as ``after``."""
    size = page_limit(limit, default=20, most=100)
    sessions = caller.client.sessions
    with sessions() as session:
        found = list_batches(session, tenant=caller.name, limit=size + 1, after=after)
    if found is None:
        raise ValidationError(
            f"after must be the id of one of your batches, got {after!r}", field="after"
        )
    views = [batch_view(sessions, batch) for batch in found[:size]]
    return cursor_page(views, has_more=len(found) > size)

"""OpenAI's Batch API: upload a JSONL file, run it as a batch of jobs, read the output files.

A batch is one row (its input file, each input line's custom id and job ids)
plus its jobs, which carry the batch id. Its status and counts are read from
the jobs; its output and error files are written from the jobs when read.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from completion_queue.errors import ValidationError
from db.batches import (
    BATCH_WINDOW,
    Batch,
    StoredFile,
    create_batch,
    create_file,
    get_batch,
    get_file,
    get_file_content,
    mark_batch_cancelled,
    new_id,
)
from db.jobs import Job, cancel_jobs, get_jobs, job_states
from db.models import FINISHED_STATUSES, JobStatus
from producer.api import APIState, State
from producer.api_errors import APIError, not_found
from producer.openai_api import check_requests, completion_requests, submit_completions
from producer.schema import Limits
from producer.views import ErrorInfo, completion_view, job_failure

router = APIRouter(prefix="/v1", tags=["batches"])

ENDPOINT = "/v1/completions"
WINDOW = "24h"
OUTPUT, ERRORS = "output", "errors"
_FILE_KEYS = {OUTPUT: "output_file_id", ERRORS: "error_file_id"}
_CHUNK = 500


class BatchBody(BaseModel):
    """``POST /v1/batches``: run every line of an uploaded JSONL file."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(description=f"Only {ENDPOINT}.")
    completion_window: str = Field(description=f"Only {WINDOW}.")
    metadata: dict[str, str] | None = None


def file_view(stored: StoredFile) -> dict[str, Any]:
    """Return a file in OpenAI's ``file`` shape."""
    return {
        "id": stored.id, "object": "file", "bytes": stored.bytes,
        "created_at": int(stored.created_at.timestamp()), "filename": stored.filename,
        "purpose": stored.purpose, "status": "processed",
    }  # fmt: skip


@router.post("/files")
async def upload_file(
    state: State,
    file: Annotated[UploadFile, File(description="JSONL, one request per line.")],
    purpose: Annotated[Literal["batch"], Form(description="Only batch.")],
) -> dict[str, Any]:
    """Store a batch input file."""
    content = await file.read()
    with state.client.sessions.begin() as session:
        stored = create_file(
            session, purpose=purpose, filename=(file.filename or "input.jsonl")[:255],
            content=content,
        )  # fmt: skip
    return file_view(stored)


def parse_input(
    content: bytes, limits: Limits, max_prompts: int
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Return each input line's custom id and our requests; a bad line is a 400 naming it."""
    lines: list[tuple[str, list[dict[str, Any]]]] = []
    seen: set[str] = set()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("input file must be UTF-8 JSONL", field="input_file_id") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            custom_id, url, body = item.get("custom_id"), item.get("url"), item.get("body")
            if not isinstance(custom_id, str) or not custom_id or custom_id in seen:
                raise ValueError("custom_id must be a non-empty string, unique in the file")
            if item.get("method", "POST") != "POST" or url != ENDPOINT:
                raise ValueError(f"method must be POST and url {ENDPOINT}")
            seen.add(custom_id)
            requests = completion_requests(body, max_prompts)
            check_requests(requests, limits)
            lines.append((custom_id, requests))
        except (ValueError, ValidationError) as exc:
            raise ValidationError(
                f"input file line {number}: {exc}", field="input_file_id"
            ) from None
    if not lines:
        raise ValidationError("input file holds no requests", field="input_file_id")
    return lines


@router.post("/batches")
def create_batch_route(body: BatchBody, state: State) -> dict[str, Any]:
    """Validate every line of the input file, queue them all as one batch."""
    if body.endpoint != ENDPOINT:
        raise ValidationError(
            f"endpoint must be {ENDPOINT}, got {body.endpoint!r}", field="endpoint"
        )
    if body.completion_window != WINDOW:
        raise ValidationError(
            f"completion_window must be {WINDOW}, got {body.completion_window!r}",
            field="completion_window",
        )
    client = state.client
    with client.sessions() as session:
        content = get_file_content(session, file_id=body.input_file_id)
    if content is None:
        raise not_found("file", body.input_file_id)
    lines = parse_input(content, client.limits, client.settings.max_batch_requests)
    batch_id = new_id("batch_")
    requests = [request for _, line in lines for request in line]
    jobs = iter(submit_completions(client, requests, batch_id=batch_id))
    grouped = [(custom_id, [next(jobs).id for _ in line]) for custom_id, line in lines]
    with client.sessions.begin() as session:
        batch = create_batch(
            session, batch_id=batch_id, input_file_id=body.input_file_id, endpoint=ENDPOINT,
            completion_window=WINDOW, metadata=body.metadata, requests=grouped,
        )  # fmt: skip
    return batch_view(state, batch)


def _batch_or_404(state: APIState, batch_id: str) -> Batch:
    with state.client.sessions() as session:
        batch = get_batch(session, batch_id=batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


def batch_view(state: APIState, batch: Batch) -> dict[str, Any]:
    """Return a batch in OpenAI's ``batch`` shape, its status and counts read from its jobs.

    A batch whose jobs the reaper failed at the end of its window is ``expired``.
    """
    with state.client.sessions() as session:
        states = job_states(session, batch_id=batch.id)
    completed = failed = 0
    for _, ids in batch.requests:
        statuses = [states[i].status if i in states else JobStatus.CANCELLED for i in ids]
        if any(s not in FINISHED_STATUSES for s in statuses):
            continue
        if all(s is JobStatus.SUCCEEDED for s in statuses):
            completed += 1
        else:
            failed += 1
    total = len(batch.requests)
    finished = completed + failed == total
    times = [s.finished_at for s in states.values() if s.finished_at is not None]
    done_at = int(max(times).timestamp()) if finished and times else None
    cancelled = batch.cancelled_at is not None
    expired = finished and any(s.error_type == "BatchExpired" for s in states.values())
    if not finished:
        status = "cancelling" if cancelled else "in_progress"
    else:
        status = "cancelled" if cancelled else "expired" if expired else "completed"
    created = int(batch.created_at.timestamp())
    cancel_at = int(batch.cancelled_at.timestamp()) if batch.cancelled_at else None
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": output_file_id(batch.id, OUTPUT) if finished and completed else None,
        "error_file_id": output_file_id(batch.id, ERRORS) if finished and failed else None,
        "created_at": created, "in_progress_at": created,
        "expires_at": int((batch.created_at + BATCH_WINDOW).timestamp()),
        "finalizing_at": done_at, "completed_at": done_at if status == "completed" else None,
        "failed_at": None, "expired_at": done_at if expired else None, "cancelling_at": cancel_at,
        "cancelled_at": done_at if cancelled else None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": batch.metadata,
    }  # fmt: skip


@router.get("/batches/{batch_id}")
def retrieve_batch(batch_id: str, state: State) -> dict[str, Any]:
    """A batch: status, request counts and, once done, its output and error files."""
    return batch_view(state, _batch_or_404(state, batch_id))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, state: State) -> dict[str, Any]:
    """Cancel a batch's unfinished jobs (running ones' results are discarded)."""
    batch = _batch_or_404(state, batch_id)
    view = batch_view(state, batch)
    if view["status"] in ("completed", "expired"):
        raise APIError(
            ErrorInfo(409, f"batch {batch_id} is already {view['status']}", code="batch_done")
        )
    with state.client.sessions.begin() as session:
        mark_batch_cancelled(session, batch_id=batch_id)
        ids = batch.job_ids
        for start in range(0, len(ids), _CHUNK):
            cancel_jobs(session, job_ids=ids[start : start + _CHUNK])
    return batch_view(state, _batch_or_404(state, batch_id))


def output_file_id(batch_id: str, kind: str) -> str:
    """Return the id of a batch's output or error file."""
    return f"file-{batch_id}-{kind}"


def output_lines(state: APIState, batch: Batch, kind: str) -> list[dict[str, Any]]:
    """Return the output (succeeded requests) or error (the rest) lines of a finished batch."""
    jobs: dict[Any, Job] = {}
    ids = batch.job_ids
    with state.client.sessions() as session:
        for start in range(0, len(ids), _CHUNK):
            jobs.update(get_jobs(session, job_ids=ids[start : start + _CHUNK]))
    lines = []
    for custom_id, line_ids in batch.requests:
        line_jobs = [jobs[i] for i in line_ids if i in jobs]
        failure = next((f for f in map(job_failure, line_jobs) if f is not None), None)
        if len(line_jobs) < len(line_ids):
            failure = ErrorInfo(404, "the request's jobs were deleted", code="not_found")
        request_id = f"req_{line_ids[0].hex}"
        entry: dict[str, Any] = {"id": f"batch_req_{line_ids[0].hex}", "custom_id": custom_id}
        if failure is None and kind == OUTPUT:
            body = completion_view(line_jobs, model=line_jobs[0].model)
            entry["response"] = {"status_code": 200, "request_id": request_id, "body": body}
            entry["error"] = None
        elif failure is not None and failure.code == "batch_expired" and kind == ERRORS:
            # OpenAI's line for a request the window closed on: no response, an error.
            entry["response"] = None
            entry["error"] = {"code": failure.code, "message": failure.message}
        elif failure is not None and kind == ERRORS:
            entry["response"] = {
                "status_code": failure.status, "request_id": request_id, "body": failure.body(),
            }  # fmt: skip
            entry["error"] = None
        else:
            continue
        lines.append(entry)
    return lines


def _output_or_none(state: APIState, file_id: str) -> tuple[Batch, str] | None:
    for kind in (OUTPUT, ERRORS):
        suffix = f"-{kind}"
        if file_id.startswith("file-batch_") and file_id.endswith(suffix):
            batch_id = file_id.removeprefix("file-").removesuffix(suffix)
            with state.client.sessions() as session:
                batch = get_batch(session, batch_id=batch_id)
            if batch is not None and batch_view(state, batch)[_FILE_KEYS[kind]] == file_id:
                return batch, kind
    return None


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, state: State) -> dict[str, Any]:
    """A file's metadata: an upload, or a finished batch's output or error file."""
    output = _output_or_none(state, file_id)
    if output is not None:
        batch, kind = output
        content = _jsonl(output_lines(state, batch, kind))
        stored = StoredFile(
            file_id, f"batch_{kind}", f"{batch.id}_{kind}.jsonl", len(content), batch.created_at
        )
        return file_view(stored)
    with state.client.sessions() as session:
        stored_file = get_file(session, file_id=file_id)
    if stored_file is None:
        raise not_found("file", file_id)
    return file_view(stored_file)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


@router.get("/files/{file_id}/content", response_class=Response)
def file_content(file_id: str, state: State) -> Response:
    """A file's bytes: an upload, or a finished batch's output or error JSONL."""
    output = _output_or_none(state, file_id)
    if output is not None:
        batch, kind = output
        return Response(_jsonl(output_lines(state, batch, kind)), media_type="application/jsonl")
    with state.client.sessions() as session:
        content = get_file_content(session, file_id=file_id)
    if content is None:
        raise not_found("file", file_id)
    return Response(content, media_type="application/jsonl")

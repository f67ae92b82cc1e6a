"""OpenAI's Batch API over our jobs: input files parsed, status and output files read from jobs.

A batch is one row (its input file, each input line's custom id and job ids)
plus its jobs, which carry the batch id. Its status and counts are read from
the jobs; its output and error files are written from the jobs when read.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.chat import chat_request
from api.errors import not_found
from api.openai import check_requests, completion_requests
from api.response_view import response_view
from api.responses import ResponseCall, response_call
from api.views import ErrorInfo, chat_view, completion_view, job_failure
from completion_queue import ValidationError
from db import (
    BATCH_WINDOW,
    FINISHED_STATUSES,
    Batch,
    Job,
    JobStatus,
    StoredFile,
    StoredResponse,
    get_batch,
    get_jobs,
    get_responses,
    job_states,
)
from producer import Limits

ENDPOINT, CHAT_ENDPOINT = "/v1/completions", "/v1/chat/completions"
RESPONSES_ENDPOINT = "/v1/responses"
#: The endpoints a batch may run (each line's ``url`` names its batch's).
ENDPOINTS = (ENDPOINT, CHAT_ENDPOINT, RESPONSES_ENDPOINT)
WINDOW = "24h"
OUTPUT, ERRORS = "output", "errors"
_FILE_KEYS = {OUTPUT: "output_file_id", ERRORS: "error_file_id"}
#: Most ids in one ``IN (...)`` list.
CHUNK = 500


def file_view(stored: StoredFile) -> dict[str, Any]:
    """Return a file in OpenAI's ``file`` shape."""
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at.timestamp()),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
    }


def parse_input(
    content: bytes,
    limits: Limits,
    max_requests: int,
    endpoint: str = ENDPOINT,
    responses: list[ResponseCall] | None = None,
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Return each input line's custom id and our requests; a bad line is a 400 naming it.

    Every line's ``url`` is the batch's ``endpoint``: a completions line may hold
    several prompts (a job each), a chat line is one job, a responses line is one
    job too, and its call (what its response row keeps) is appended to ``responses``.

    Lines end at ``\n`` only (JSON strings may hold U+2028 and other line breaks),
    and parsing stops as soon as the file holds more than ``max_requests`` requests.
    """
    lines: list[tuple[str, list[dict[str, Any]]]] = []
    seen: set[str] = set()
    total = 0
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("input file must be UTF-8 JSONL", field="input_file_id") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            custom_id, url, body = item.get("custom_id"), item.get("url"), item.get("body")
            if not isinstance(custom_id, str) or not custom_id or custom_id in seen:
                raise ValueError("custom_id must be a non-empty string, unique in the file")
            if item.get("method", "POST") != "POST" or url != endpoint:
                raise ValueError(f"method must be POST and url {endpoint}, as the batch's")
            seen.add(custom_id)
            if endpoint == CHAT_ENDPOINT:
                requests = [chat_request(body)]
            elif endpoint == RESPONSES_ENDPOINT:
                call = response_call(body, limits, in_batch=True)
                requests = [call.request]
                if responses is not None:
                    responses.append(call)
            else:
                requests = completion_requests(body, max_requests)
            total += len(requests)
            if total > max_requests:
                raise ValidationError(
                    f"the file holds more than {max_requests} requests (CQ_MAX_BATCH_REQUESTS)",
                    field="input_file_id",
                )
            check_requests(requests, limits)
            lines.append((custom_id, requests))
        except (ValueError, ValidationError) as exc:
            raise ValidationError(
                f"input file line {number}: {exc}", field="input_file_id"
            ) from None
    if not lines:
        raise ValidationError("input file holds no requests", field="input_file_id")
    return lines


def batch_or_404(
    sessions: sessionmaker[Session], batch_id: str, *, tenant: str | None = None
) -> Batch:
    """Return the batch (of ``tenant``'s, when given); an unknown id is a 404."""
    with sessions() as session:
        batch = get_batch(session, batch_id=batch_id, tenant=tenant)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


def batch_view(sessions: sessionmaker[Session], batch: Batch) -> dict[str, Any]:
    """Return a batch in OpenAI's ``batch`` shape, its status and counts read from its jobs.

    A batch whose jobs the reaper failed at the end of its window is ``expired``.
    """
    with sessions() as session:
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
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": output_file_id(batch.id, OUTPUT) if finished and completed else None,
        "error_file_id": output_file_id(batch.id, ERRORS) if finished and failed else None,
        "created_at": created,
        "in_progress_at": created,
        "expires_at": int((batch.created_at + BATCH_WINDOW).timestamp()),
        "finalizing_at": done_at,
        "completed_at": done_at if status == "completed" else None,
        "failed_at": None,
        "expired_at": done_at if expired else None,
        "cancelling_at": cancel_at,
        "cancelled_at": done_at if cancelled else None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": batch.metadata,
    }


def output_file_id(batch_id: str, kind: str) -> str:
    """Return the id of a batch's output or error file."""
    return f"file-{batch_id}-{kind}"


def output_lines(sessions: sessionmaker[Session], batch: Batch, kind: str) -> list[dict[str, Any]]:
    """Return the output (succeeded requests) or error (the rest) lines of a finished batch."""
    jobs: dict[Any, Job] = {}
    stored: dict[Any, StoredResponse] = {}
    ids = batch.job_ids
    with sessions() as session:
        for start in range(0, len(ids), CHUNK):
            jobs.update(get_jobs(session, job_ids=ids[start : start + CHUNK]))
            if batch.endpoint == RESPONSES_ENDPOINT:
                stored.update(get_responses(session, response_ids=ids[start : start + CHUNK]))
    lines = []
    for custom_id, line_ids in batch.requests:
        line_jobs = [jobs[i] for i in line_ids if i in jobs]
        failure = next((f for f in map(job_failure, line_jobs) if f is not None), None)
        if len(line_jobs) < len(line_ids):
            failure = ErrorInfo(404, "the request's jobs were deleted", code="not_found")
        request_id = f"req_{line_ids[0].hex}"
        entry: dict[str, Any] = {"id": f"batch_req_{line_ids[0].hex}", "custom_id": custom_id}
        if failure is None and kind == OUTPUT:
            if batch.endpoint == CHAT_ENDPOINT:
                body = chat_view(line_jobs[0], model=line_jobs[0].model)
            elif batch.endpoint == RESPONSES_ENDPOINT:
                body = response_view(line_jobs[0], stored[line_jobs[0].id])
            else:
                body = completion_view(line_jobs, model=line_jobs[0].model)
            entry["response"] = {"status_code": 200, "request_id": request_id, "body": body}
            entry["error"] = None
        elif failure is not None and failure.code == "batch_expired" and kind == ERRORS:
            # OpenAI's line for a request the window closed on: no response, an error.
            entry["response"] = None
            entry["error"] = {"code": failure.code, "message": failure.message}
        elif failure is not None and kind == ERRORS:
            entry["response"] = {
                "status_code": failure.status,
                "request_id": request_id,
                "body": failure.body(),
            }
            entry["error"] = None
        else:
            continue
        lines.append(entry)
    return lines


def find_output(
    sessions: sessionmaker[Session], file_id: str, *, tenant: str | None = None
) -> tuple[Batch, str] | None:
    """Return the finished batch (of ``tenant``'s) and kind of an output file id, or None."""
    for kind in (OUTPUT, ERRORS):
        suffix = f"-{kind}"
        if file_id.startswith("file-batch_") and file_id.endswith(suffix):
            batch_id = file_id.removeprefix("file-").removesuffix(suffix)
            with sessions() as session:
                batch = get_batch(session, batch_id=batch_id, tenant=tenant)
            if batch is not None and batch_view(sessions, batch)[_FILE_KEYS[kind]] == file_id:
                return batch, kind
    return None


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    """Return ``lines`` as JSON Lines bytes."""
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()

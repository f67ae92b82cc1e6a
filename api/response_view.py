"""What the Responses API answers: a job and its response row as OpenAI's ``response``, its
input items, and the typed events of a streamed response.

A job's status maps onto a response's: queued → ``queued``, running →
``in_progress``, succeeded → ``completed`` (``incomplete`` when it stopped at
``max_output_tokens``), failed → ``failed`` (with the error), cancelled →
``cancelled``. While it runs its output holds the text so far, from the row.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool

from api.responses import response_id
from api.streaming import StreamedCall, sse
from api.views import ErrorInfo, job_failure
from completion_queue import CompletionError
from db import Job, JobStatus, StoredResponse
from producer import Delta

log = logging.getLogger(__name__)

_STATUSES = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}


def response_status(job: Job) -> str:
    """The response status of ``job`` (``incomplete``: it stopped at its token budget)."""
    if job.status is JobStatus.SUCCEEDED and job.choices[0].finish_reason == "length":
        return "incomplete"
    return _STATUSES[job.status]


def output_message(job: Job, status: str) -> dict[str, Any]:
    """The assistant message of ``job``'s text (so far, while it runs)."""
    text = job.choices[0].text if job.choices else ""
    return {
        "id": f"msg_{job.id.hex}",
        "type": "message",
        "role": "assistant",
        "status": {"completed": "completed", "in_progress": "in_progress"}.get(
            status, "incomplete"
        ),
        "content": [output_text(text)],
    }


def output_text(text: str) -> dict[str, Any]:
    """An ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_view(job: Job, stored: StoredResponse) -> dict[str, Any]:
    """Return ``job`` and its response row as OpenAI's ``response`` object."""
    status = response_status(job)
    failure = job_failure(job) if job.status is JobStatus.FAILED else None
    text_format = (stored.text or {}).get("format") or {"type": "text"}
    usage = None
    if job.prompt_tokens is not None:
        used = job.completion_tokens or 0
        usage = {
            "input_tokens": job.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": used,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": job.prompt_tokens + used,
        }
    done = status in ("completed", "incomplete") and job.finished_at is not None
    return {
        "id": response_id(job.id),
        "object": "response",
        "created_at": int(job.created_at.timestamp()),
        "completed_at": int(job.finished_at.timestamp()) if done and job.finished_at else None,
        "status": status,
        "background": stored.background,
        "error": None
        if failure is None
        else {"code": failure.code or failure.type, "message": failure.message},
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": stored.instructions,
        "input": None,
        "max_output_tokens": job.params.get("max_new_tokens"),
        "metadata": stored.metadata or {},
        "model": job.model,
        "output": [output_message(job, status)] if job.choices else [],
        "parallel_tool_calls": False,
        "previous_response_id": stored.previous_response_id,
        "reasoning": None,
        "store": True,
        "temperature": job.params.get("temperature"),
        "text": {"format": text_format},
        "tool_choice": "none",
        "tools": [],
        "top_p": job.params.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
    }


def input_item_views(job: Job, stored: StoredResponse) -> list[dict[str, Any]]:
    """The response's input items (not its previous response's), first to last."""
    return [
        {
            "id": f"msg_{job.id.hex}_{index}",
            "type": "message",
            "role": item["role"],
            "status": "completed",
            "content": [
                output_text(item["content"])
                if item["role"] == "assistant"
                else {"type": "input_text", "text": item["content"]}
            ],
        }
        for index, item in enumerate(stored.input)
    ]


async def response_events(call: StreamedCall, stored: StoredResponse) -> AsyncIterator[bytes]:
    """The typed events of a streamed response, as OpenAI sends them.

    ``response.created``; at the first text ``response.in_progress``, the message's
    ``output_item.added`` and ``content_part.added``; ``response.output_text.delta``
    per new text; then ``output_text.done``, ``content_part.done``,
    ``output_item.done`` and ``response.completed`` (``response.incomplete`` at the
    token budget). A job that fails ends with ``response.failed``; anything else that
    ends the stream early (a cancel, the wait running out) with an ``error`` event.
    """
    job = call.jobs[0]
    sequence = itertools.count()
    item_id = f"msg_{job.id.hex}"
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

    def opening() -> list[bytes]:
        running = {**response_view(job, stored), "status": "in_progress", "output": []}
        item = {**output_message(job, "in_progress"), "content": []}
        return [
            event("response.in_progress", response=running),
            event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", **at, part=output_text("")),
        ]

    yield event("response.created", response=response_view(job, stored))
    opened = False
    async for outcome in call.outcomes():
        if isinstance(outcome, ErrorInfo):
            yield await _failure(call, stored, outcome, event)
            return
        if not opened:
            opened = True
            for opening_event in opening():
                yield opening_event
        if isinstance(outcome, Delta):
            yield event("response.output_text.delta", **at, delta=outcome.text, logprobs=[])
            continue
        finished = response_view(outcome.job, stored)
        message = finished["output"][0]
        text = message["content"][0]["text"]
        yield event("response.output_text.done", **at, text=text, logprobs=[])
        yield event("response.content_part.done", **at, part=output_text(text))
        yield event("response.output_item.done", output_index=0, item=message)
        kind = "response.incomplete" if finished["status"] == "incomplete" else "response.completed"
        yield event(kind, response=finished)


async def _failure(
    call: StreamedCall, stored: StoredResponse, error: ErrorInfo, event: Callable[..., bytes]
) -> bytes:
    """``response.failed`` for a failed job; an ``error`` event for anything else."""
    job: Job | None = None
    with contextlib.suppress(CompletionError):
        job = await run_in_threadpool(call.client.get, call.jobs[0].id)
    if job is not None and job.status is JobStatus.FAILED:
        return event("response.failed", response=response_view(job, stored))
    return event("error", code=error.code, message=error.message, param=error.param)

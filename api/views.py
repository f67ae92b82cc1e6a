"""What the HTTP API answers: jobs, OpenAI completions and errors as JSON-ready dicts.

Pure functions of :class:`db.jobs.Job` snapshots, shared by the API routes, the
batch output files and the webhook bodies, so each shape is written once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from api.logprobs import chat_logprobs, completion_logprobs
from db import Job, JobStatus


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error in OpenAI's shape, with the HTTP status it is sent with."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        """Return ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def usage(jobs: Sequence[Job]) -> dict[str, int]:
    """Return OpenAI's ``usage`` over ``jobs``: prompt, completion and total tokens."""
    prompt = sum(job.prompt_tokens or 0 for job in jobs)
    completion = sum(job.completion_tokens or 0 for job in jobs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def job_view(job: Job) -> dict[str, Any]:
    """Return a job as ``GET /v1/jobs/{id}`` shows it: every column, usage and timings."""
    view = {"object": "job", **job.to_dict()}
    view["usage"] = usage([job]) if job.prompt_tokens is not None else None
    started, finished = job.started_at, job.finished_at
    view["timings"] = {
        "queued_s": (started - job.created_at).total_seconds() if started else None,
        "run_s": (finished - started).total_seconds() if started and finished else None,
        "total_s": job.latency_s,
    }
    return view


def job_failure(job: Job) -> ErrorInfo | None:
    """Return the error a finished, unsuccessful job answers with; None if it succeeded."""
    if job.status is JobStatus.SUCCEEDED:
        return None
    if job.status is JobStatus.CANCELLED:
        return ErrorInfo(409, f"job {job.id} was cancelled", code="cancelled")
    if job.status is not JobStatus.FAILED:
        return ErrorInfo(503, f"job {job.id} is still {job.status.value}", "server_error")
    error = job.error or {}
    kind, message = error.get("type", "ModelError"), error.get("message", "generation failed")
    if kind == "ContextLengthExceeded":
        # The field to change: max_tokens when it fills the context alone, else the input.
        budget = "max_new_tokens must be below" in message
        param = "max_tokens" if budget else "messages" if job.messages else "prompt"
        return ErrorInfo(
            400, _in_openai_terms(message), param=param, code="context_length_exceeded"
        )
    if kind == "BatchExpired":
        return ErrorInfo(408, message, code="batch_expired")
    if kind == "DeadlineExceeded":
        return ErrorInfo(408, message, code="deadline_exceeded")
    return ErrorInfo(500, f"generation failed: {message}", "server_error", code=kind)


def _in_openai_terms(message: str) -> str:
    """A worker's ``ContextLengthExceeded`` message as an OpenAI caller reads it: its
    ``max_tokens``, and the way to truncate that the OpenAI routes offer (they refuse
    ``truncate`` itself), not the CLI's."""
    problem, hint, _ = message.partition(" (truncate: true")
    problem = problem.replace("max_new_tokens", "max_tokens")
    if hint:
        problem += " (POST /v1/jobs with truncate: true keeps a too-long prompt's last tokens)"
    return problem


def completion_view(jobs: Sequence[Job], *, model: str) -> dict[str, Any]:
    """Return succeeded ``jobs`` (one per prompt, in order) as an OpenAI ``text_completion``.

    Choices are numbered prompt by prompt, ``n`` each, as OpenAI numbers them.
    """
    choices = [
        {
            "text": c.text,
            "index": 0,
            "finish_reason": c.finish_reason,
            "logprobs": completion_logprobs(c),
        }
        for job in jobs
        for c in job.choices
    ]
    for index, choice in enumerate(choices):
        choice["index"] = index
    head = response_head(jobs[0], "cmpl", "text_completion", model=model)
    return {**head, "choices": choices, "usage": usage(jobs)}


def chat_view(job: Job, *, model: str) -> dict[str, Any]:
    """Return a succeeded chat ``job`` as an OpenAI ``chat.completion``: one choice per ``n``."""
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": chat_logprobs(c),
            "finish_reason": c.finish_reason,
        }
        for index, c in enumerate(job.choices)
    ]
    head = response_head(job, "chatcmpl", "chat.completion", model=model)
    return {
        **head,
        "choices": choices,
        "usage": usage([job]),
        "system_fingerprint": system_fingerprint(model),
    }


def response_head(job: Job, prefix: str, kind: str, *, model: str) -> dict[str, Any]:
    """Return the fields an OpenAI completion object opens with: its ``id`` (``prefix`` and the
    first job's id), ``object`` (``kind``), ``created`` and ``model``."""
    return {
        "id": f"{prefix}-{job.id.hex}",
        "object": kind,
        "created": int(job.created_at.timestamp()),
        "model": model,
    }


def system_fingerprint(model: str) -> str:
    """Return OpenAI's ``system_fingerprint``: it changes when the model or our release does."""
    try:
        release = version("completion-queue")
    except PackageNotFoundError:
        release = "unknown"
    return "fp_" + hashlib.sha256(f"{release}:{model}".encode()).hexdigest()[:10]

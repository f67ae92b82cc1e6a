"""Jobs as everyone reads them: immutable snapshots of rows, and what a worker writes back.

Plain dataclasses, no session: the client, the worker, the API and the CLI pass
them around after the session that read them is closed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from db.models import LANE_INTERACTIVE, JobRow, JobStatus, WebhookStatus


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def aware(value: datetime | None) -> datetime | None:
    """Return ``value`` with UTC attached when it has no zone (SQLite hands back naive times)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True, slots=True)
class Choice:
    """One generated completion of a job."""

    text: str
    #: ``stop``, ``length`` or ``cancelled``; None while the job runs (partial output).
    finish_reason: str | None
    completion_tokens: int
    #: Per generated token, when the job asked for logprobs: OpenAI's chat shape,
    #: ``{"token", "bytes", "logprob", "top_logprobs": [{"token", "bytes", "logprob"}]}``.
    logprobs: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in ``jobs.choices``."""
        stored: dict[str, Any] = {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
        }
        if self.logprobs is not None:
            stored["logprobs"] = self.logprobs
        return stored


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job's row."""

    id: uuid.UUID
    status: JobStatus
    model: str
    prompt: str
    params: dict[str, Any]
    choices: list[Choice]
    prompt_tokens: int | None
    completion_tokens: int | None
    error: dict[str, str] | None
    attempts: int
    worker: str | None
    priority: int
    idempotency_key: str | None
    batch_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    callback_url: str | None = None
    webhook_status: WebhookStatus | None = None
    webhook_attempts: int = 0
    webhook_error: str | None = None
    webhook_delivered_at: datetime | None = None
    truncated_prompt_tokens: int | None = None
    tenant: str | None = None
    #: A chat job's conversation; None for a prompt job.
    messages: list[dict[str, str]] | None = None
    #: ``interactive`` or ``batch`` (db.models.LANES).
    lane: str = LANE_INTERACTIVE
    #: When the job must have started by, else it fails with ``deadline_exceeded``.
    deadline: datetime | None = None

    @property
    def summary(self) -> str:
        """The prompt, or for a chat job its last message as ``role: content``."""
        if self.messages:
            last = self.messages[-1]
            return f"{last['role']}: {last['content']}"
        return self.prompt

    @property
    def text(self) -> str | None:
        """The first choice's text, or None before the job succeeded."""
        return self.choices[0].text if self.choices else None

    @property
    def latency_s(self) -> float | None:
        """Seconds from submit to the finished row; None while unfinished, and for a job
        cancelled before it ran (it was never served)."""
        if self.finished_at is None or (
            self.status is JobStatus.CANCELLED and self.started_at is None
        ):
            return None
        return (self.finished_at - self.created_at).total_seconds()

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        """Build a snapshot from an ORM row."""
        created = aware(row.created_at)
        assert created is not None
        return cls(
            id=row.id,
            status=JobStatus(row.status),
            model=row.model,
            prompt=row.prompt,
            params=dict(row.params or {}),
            choices=[Choice(**c) for c in row.choices or []],
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            error=row.error,
            attempts=row.attempts,
            worker=row.worker,
            priority=row.priority,
            idempotency_key=row.idempotency_key,
            batch_id=row.batch_id,
            created_at=created,
            started_at=aware(row.started_at),
            finished_at=aware(row.finished_at),
            callback_url=row.callback_url,
            webhook_status=WebhookStatus(row.webhook_status) if row.webhook_status else None,
            webhook_attempts=row.webhook_attempts or 0,
            webhook_error=row.webhook_error,
            webhook_delivered_at=aware(row.webhook_delivered_at),
            truncated_prompt_tokens=row.truncated_prompt_tokens,
            tenant=row.tenant,
            messages=row.messages,
            lane=row.lane,
            deadline=aware(row.deadline),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every column."""
        return {
            "id": str(self.id),
            "status": self.status.value,
            "model": self.model,
            "prompt": self.prompt,
            "messages": self.messages,
            "params": self.params,
            "choices": [c.to_dict() for c in self.choices],
            "prompt_tokens": self.prompt_tokens,
            "truncated_prompt_tokens": self.truncated_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error": self.error,
            "attempts": self.attempts,
            "worker": self.worker,
            "priority": self.priority,
            "idempotency_key": self.idempotency_key,
            "batch_id": self.batch_id,
            "tenant": self.tenant,
            "lane": self.lane,
            "deadline": _iso(self.deadline),
            "created_at": self.created_at.isoformat(),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "callback_url": self.callback_url,
            "webhook_status": self.webhook_status.value if self.webhook_status else None,
            "webhook_attempts": self.webhook_attempts,
            "webhook_error": self.webhook_error,
            "webhook_delivered_at": _iso(self.webhook_delivered_at),
        }


@dataclass(frozen=True, slots=True)
class NewJob:
    """What a producer inserts: a validated request, not yet queued."""

    model: str
    prompt: str
    params: dict[str, Any]
    priority: int = 0
    idempotency_key: str | None = None
    batch_id: str | None = None
    callback_url: str | None = None
    tenant: str | None = None
    messages: list[dict[str, str]] | None = None
    lane: str = LANE_INTERACTIVE
    deadline: datetime | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    #: Estimated prompt tokens and most new tokens (``completion_queue.fair.job_cost``).
    cost: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a worker writes back for one claimed job."""

    job_id: uuid.UUID
    attempt: int
    status: JobStatus
    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int | None = None
    error: dict[str, str] | None = None
    #: Prompt tokens dropped to fit the context (the request asked for ``truncate``).
    truncated_prompt_tokens: int | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices."""
        return sum(c.completion_tokens for c in self.choices)


@dataclass(frozen=True, slots=True)
class Finished:
    """What one :func:`db.jobs.finish_jobs` wrote."""

    #: Rows changed: outcomes written under the attempt that still held their job.
    changed: int
    #: Jobs whose finished rows were written cancelled: the cancel came after the worker's
    #: last look, so their outcomes said succeeded.
    cancelled_late: frozenset[uuid.UUID] = frozenset()


class JobState(NamedTuple):
    """Where a job of a batch stands: what a batch's status is computed from."""

    status: JobStatus
    finished_at: datetime | None
    error_type: str | None


def error_dict(exc: BaseException) -> dict[str, str]:
    """Return the stored form of an error (``jobs.error``): its type and message."""
    return {"type": type(exc).__name__, "message": str(exc) or repr(exc)}

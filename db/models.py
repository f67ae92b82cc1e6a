"""The tables: jobs (one row per job, the truth about it), the API's files, batches and
responses, tenants."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobStatus(str, enum.Enum):
    """Where a job stands: queued → running → succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the end states, which never change again."""
        return self in FINISHED_STATUSES

    def __str__(self) -> str:
        return self.value


class WebhookStatus(str, enum.Enum):
    """Where a job's completion webhook stands: pending → delivered | failed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


#: The lanes a job runs in: interactive work (a caller waits for it) goes ahead of batch lines.
LANE_INTERACTIVE = "interactive"
LANE_BATCH = "batch"
LANES = (LANE_INTERACTIVE, LANE_BATCH)

FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: A job in one of these may still run (claimed, cancelled, failed by the reaper).
UNFINISHED_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


def _status_column(statuses: type[enum.Enum], name: str) -> Enum:
    # Stored as short strings (no native enum type), so adding a status is no migration.
    return Enum(
        statuses,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
        name=name,
    )


class Base(DeclarativeBase):
    """Declarative base of our tables."""


class JobRow(Base):
    """A completion job as stored; read through :class:`db.snapshots.Job`."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    status: Mapped[JobStatus] = mapped_column(
        _status_column(JobStatus, "job_status"), nullable=False
    )
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    # Empty for a chat job, whose conversation is in messages.
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    # A chat job's messages, [{"role", "content"}, ...]; null for a prompt job.
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    choices: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    # Prompt tokens dropped from the start to fit the context; null when none were.
    truncated_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, str] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Unique per tenant (see the indexes below); null: none given.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # The tenant that submitted the job (tenants.name); null: the trusted, operator side.
    tenant: Mapped[str | None] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(64))
    # ``interactive`` (a caller waits for it) or ``batch``: interactive work goes first.
    lane: Mapped[str] = mapped_column(
        String(16), nullable=False, default=LANE_INTERACTIVE, server_default=LANE_INTERACTIVE
    )
    # A job not started by then fails with ``deadline_exceeded``; null: no deadline.
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What the producer estimated the job costs (``completion_queue.fair.job_cost``): its
    # prompt's tokens and the most it may generate; the backlog signal sums them over queued
    # rows. Null: not estimated (a row written without one).
    cost_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_new_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_status: Mapped[WebhookStatus | None] = mapped_column(
        _status_column(WebhookStatus, "webhook_status")
    )
    webhook_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    webhook_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_error: Mapped[str | None] = mapped_column(Text)
    webhook_delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_batch_id", "batch_id"),
        Index("ix_jobs_created_at", "created_at"),
        Index("ix_jobs_webhook_due", "webhook_status", "webhook_next_at"),
        Index("ix_jobs_status_deadline", "status", "deadline"),
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        # Covers the backlog signal's sums over queued (and running) rows, per model and tenant.
        Index(
            "ix_jobs_backlog",
            "status",
            "model",
            "tenant",
            "cost_prompt_tokens",
            "cost_new_tokens",
        ),
        # The rows finished in the last minute (tokens/s) or stats window.
        Index("ix_jobs_finished_at", "finished_at"),
        Index("uq_jobs_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
        # A null tenant is distinct from every other in the index above: this one covers it.
        Index(
            "uq_jobs_idempotency_key_no_tenant",
            "idempotency_key",
            unique=True,
            sqlite_where=text("tenant IS NULL"),
            postgresql_where=text("tenant IS NULL"),
        ),
    )


class FileRow(Base):
    """A file uploaded through the API (a batch's JSONL input)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    size_bytes: Mapped[int] = mapped_column("bytes", Integer, nullable=False)
    content: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    tenant: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_files_tenant_created_at", "tenant", "created_at", "id"),)


class BatchRow(Base):
    """An OpenAI-style batch: its input file, its requests' job ids, its lifecycle times."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    input_file_id: Mapped[str] = mapped_column(String(64), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(16), nullable=False)
    # "metadata" is reserved on declarative classes; the column keeps OpenAI's name.
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    # [[custom_id, [job id, ...]], ...] in input order: one entry per input line.
    requests: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    tenant: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_batches_tenant_created_at", "tenant", "created_at", "id"),)


class ResponseRow(Base):
    """What an OpenAI response adds to its job (one row each, the job's id as its own)."""

    __tablename__ = "responses"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64))
    # Kept apart from the input: a response continued from this one does not inherit them.
    instructions: Mapped[str | None] = mapped_column(Text)
    # The input items of this response as given ([{"role", "content"}, ...]), without the
    # conversation of its previous response.
    input: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    previous_response_id: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    # The ``text`` parameter as given (its ``format``), echoed back on the response.
    text: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    background: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class TenantRow(Base):
    """A tenant of the HTTP API: one API key (only its hash is kept) and its quotas."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # SHA-256 hex of the key: a random 256-bit token needs no slow hash.
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # The models it may use; null: any.
    models: Mapped[list[str] | None] = mapped_column(JSON)
    # Most jobs it may have queued at once, and requests per second; null: no limit.
    max_queued: Mapped[int | None] = mapped_column(Integer)
    rate: Mapped[float | None] = mapped_column(Float)
    # Its share of a model's workers relative to the other tenants' (fair share).
    weight: Mapped[float] = mapped_column(
        Float, nullable=False, default=1.0, server_default=text("1.0")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

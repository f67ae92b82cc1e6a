"""Test data: a job snapshot with sensible defaults, overridden by keyword."""

from __future__ import annotations

import uuid
from typing import Any

from db import Job, JobStatus, utcnow


def make_job(prompt: str = "Once upon a time", **overrides: Any) -> Job:
    """Return a running job of model ``m`` claimed once by worker ``w``; ``overrides`` win."""
    now = utcnow()
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "status": JobStatus.RUNNING,
        "model": "m",
        "prompt": prompt,
        "params": {},
        "choices": [],
        "prompt_tokens": None,
        "completion_tokens": None,
        "error": None,
        "attempts": 1,
        "worker": "w",
        "priority": 0,
        "lane": "interactive",
        "idempotency_key": None,
        "batch_id": None,
        "created_at": now,
        "started_at": now,
        "finished_at": None,
    }
    return Job(**{**fields, **overrides})

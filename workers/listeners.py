"""Hooks on the batches a worker runs, in the manner of dramatiq's middleware.

A :class:`BatchListener` overrides only the hooks it needs; the others do
nothing. Task events, job counts and Prometheus metrics are listeners. A
listener must never fail a batch: the task and the runner log what it raises
and go on.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from db import Job, Outcome


class BatchListener:
    """Watches batches go by; every hook is a no-op until a subclass overrides it."""

    def received(self, requests: Sequence[Any]) -> None:
        """A flush of task requests goes to the model process (called in the main process)."""

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """The ``jobs`` now run; the ``skipped`` ids were finished or cancelled already."""

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """The outcomes of ``jobs`` are committed; generating them took ``generation_s``."""

    def first_tokens(self, jobs: Sequence[Job], times: Mapping[str, float]) -> None:
        """The ``jobs`` got their first tokens at ``times`` (epoch seconds, by job id)."""

"""The worker's Prometheus metrics: a batch listener feeding :class:`Metrics`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from completion_queue import Metrics
from db import Job, Outcome, utcnow
from workers.listeners import BatchListener


class WorkerMetrics(BatchListener):
    """Observes every batch a worker runs: queue time, first token, generation, latency, tokens."""

    def __init__(self, metrics: Metrics, *, model: str) -> None:
        self.metrics = metrics
        self.model = model

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """Record each claimed job's queue wait."""
        for job in jobs:
            if job.started_at is not None:
                wait_s = (job.started_at - job.created_at).total_seconds()
                self.metrics.observe_started(model=self.model, queue_wait_s=wait_s)

    def first_tokens(self, jobs: Sequence[Job], times: Mapping[str, float]) -> None:
        """Record each job's time to first token, from its submit."""
        for job in jobs:
            at = times.get(str(job.id))
            if at is not None:
                seconds = at - job.created_at.timestamp()
                self.metrics.observe_first_token(model=self.model, seconds=seconds)

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """Record the batch and each job's status and end-to-end latency."""
        now = utcnow()
        created = {job.id: job.created_at for job in jobs}
        for outcome in outcomes:
            latency_s = (now - created[outcome.job_id]).total_seconds()
            self.metrics.observe_finished(
                model=self.model, status=outcome.status.value, latency_s=latency_s
            )
        tokens = sum(outcome.completion_tokens for outcome in outcomes)
        self.metrics.observe_batch(
            model=self.model, jobs=len(jobs), generation_s=generation_s, tokens=tokens
        )

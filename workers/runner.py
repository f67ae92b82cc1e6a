"""One micro-batch, start to end: claim the jobs, generate, write every result at once."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from completion_queue.errors import ContextLengthExceeded, FatalModelError
from db.jobs import Job, Outcome, claim_jobs, finish_jobs
from db.models import JobStatus
from workers.batching import GenerationRequest, plan_groups
from workers.model import GenerationResult, ModelRuntime

log = logging.getLogger(__name__)


def error_dict(exc: BaseException) -> dict[str, str]:
    """Return the stored form of an error: its type and message."""
    return {"type": type(exc).__name__, "message": str(exc) or repr(exc)}


def to_request(job: Job, prompt_ids: Sequence[int]) -> GenerationRequest:
    """Return the runtime's view of ``job``."""
    params = job.params
    return GenerationRequest(
        key=str(job.id),
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=int(params.get("max_new_tokens", 16)),
        temperature=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p", 1.0)),
        top_k=int(params.get("top_k", 0)),
        repetition_penalty=float(params.get("repetition_penalty", 1.0)),
        n=int(params.get("n", 1)),
        stop=tuple(params.get("stop") or ()),
        seed=params.get("seed"),
    )


class BatchListener(Protocol):
    """Watches batches go by (task events, metrics); it must never fail a batch."""

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """The ``jobs`` now run; the ``skipped`` ids were finished or cancelled already."""

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """The outcomes of ``jobs`` are committed; generating them took ``generation_s``."""


class BatchRunner:
    """Runs micro-batches of job ids against one resident model and one database."""

    def __init__(
        self,
        runtime: ModelRuntime,
        sessions: sessionmaker[Session],
        *,
        max_rows: int,
        listeners: Sequence[BatchListener] = (),
    ) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.max_rows = max_rows
        self.listeners = list(listeners)

    def run(self, job_ids: Sequence[str], *, worker: str) -> list[Outcome]:
        """Claim, generate and commit one batch; return the outcomes written."""
        ids = [uuid.UUID(job_id) for job_id in job_ids]
        with self.sessions.begin() as session:
            claimed = claim_jobs(session, job_ids=ids, worker=worker)
        held = {job.id for job in claimed}
        skipped = [job_id for job_id in ids if job_id not in held]
        self._tell("claimed", claimed, skipped=skipped, worker=worker)
        if not claimed:
            return []
        started = time.perf_counter()
        outcomes = self.generate(claimed)
        generation_s = time.perf_counter() - started
        with self.sessions.begin() as session:
            finish_jobs(session, outcomes=outcomes)
        self._tell("finished", claimed, outcomes, generation_s=generation_s)
        return outcomes

    def _tell(self, event: str, *args: object, **kwargs: object) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, event)(*args, **kwargs)
            except Exception:
                # Monitoring is never a reason to lose or fail a batch.
                log.exception("batch listener %r failed on %s", listener, event)

    def generate(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Return an outcome for every job; a job that fails fails alone."""
        attempts = {str(job.id): job.attempts for job in jobs}
        outcomes: list[Outcome] = []
        requests: list[GenerationRequest] = []
        encoded = self.runtime.encode([job.prompt for job in jobs])
        for job, prompt_ids in zip(jobs, encoded, strict=True):
            request = to_request(job, prompt_ids)
            needed = len(prompt_ids) + request.max_new_tokens
            if needed > self.runtime.context_length:
                exc = ContextLengthExceeded(
                    f"prompt has {len(prompt_ids)} tokens and max_new_tokens is "
                    f"{request.max_new_tokens}: {needed} exceeds the model's context of "
                    f"{self.runtime.context_length} tokens"
                )
                outcomes.append(self._failed(job.id, job.attempts, exc, len(prompt_ids)))
            else:
                requests.append(request)
        for group in plan_groups(requests, max_rows=self.max_rows):
            for request, result in self._run_group(group):
                key = uuid.UUID(request.key)
                if isinstance(result, BaseException):
                    outcomes.append(
                        self._failed(key, attempts[request.key], result, len(request.prompt_ids))
                    )
                else:
                    outcomes.append(
                        Outcome(
                            job_id=key,
                            attempt=attempts[request.key],
                            status=JobStatus.SUCCEEDED,
                            choices=result.choices,
                            prompt_tokens=result.prompt_tokens,
                        )
                    )
        return outcomes

    def _run_group(
        self, group: list[GenerationRequest]
    ) -> list[tuple[GenerationRequest, GenerationResult | Exception]]:
        try:
            return list(zip(group, self.runtime.generate(group), strict=True))
        except FatalModelError:
            raise
        except Exception as exc:
            if len(group) == 1:
                log.warning("job %s failed: %s", group[0].key, exc)
                return [(group[0], exc)]
            # One bad job must not fail its batch-mates: find it by running them alone.
            log.warning("group of %d failed (%s); retrying its jobs one by one", len(group), exc)
            return [pair for request in group for pair in self._run_group([request])]

    @staticmethod
    def _failed(job_id: uuid.UUID, attempt: int, exc: BaseException, prompt_tokens: int) -> Outcome:
        return Outcome(
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.FAILED,
            prompt_tokens=prompt_tokens,
            error=error_dict(exc),
        )

"""One flush of messages, start to end: plan groups, then claim, generate and commit each.

A flush holds up to ``batch_size * batch_lookahead`` jobs. They are read once,
ordered by token budget and prompt length, and cut into groups of at most
``batch_size`` rows. Each group is claimed (marked running) just before it runs,
and its results are committed in the same transaction that claims the next
group: one transaction per group.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from completion_queue.errors import ContextLengthExceeded, FatalModelError
from db.jobs import Job, Outcome, claim_jobs, finish_jobs, get_unfinished_jobs
from db.models import JobStatus
from workers.batching import GenerationRequest, plan_groups
from workers.model import GenerationResult

log = logging.getLogger(__name__)

#: What a unit of a flush does with its claimed jobs: their outcomes.
Work = Callable[[list[Job]], list[Outcome]]


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


class Engine(Protocol):
    """What runs generation: the static :class:`ModelRuntime` or the continuous engine."""

    context_length: int

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each prompt."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Return one result per request, in order."""


class BatchListener(Protocol):
    """Watches batches go by (task events, metrics); it must never fail a batch."""

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """The ``jobs`` now run; the ``skipped`` ids were finished or cancelled already."""

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """The outcomes of ``jobs`` are committed; generating them took ``generation_s``."""


class BatchRunner:
    """Runs flushes of job ids against one resident model and one database."""

    def __init__(
        self,
        runtime: Engine,
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
        """Run every unfinished job among ``job_ids``; return the outcomes written."""
        ids = [uuid.UUID(i) for i in job_ids]
        with self.sessions() as session:
            jobs = get_unfinished_jobs(session, job_ids=ids)
        if not jobs:
            self._tell("claimed", [], skipped=ids, worker=worker)
            return []
        requests, rejected = self.plan(jobs)
        errors = {job.id: exc for job, exc in rejected}
        # Each unit is claimed, run, then committed with the next unit's claim. Jobs refused
        # before generating (too long for the context) come first and fail at once.
        units: list[tuple[list[uuid.UUID], Work]] = []
        if errors:
            units.append((list(errors), partial(self._refuse, errors)))
        for group in plan_groups(requests, max_rows=self.max_rows):
            units.append(([uuid.UUID(r.key) for r in group], partial(self._generate, group)))
        written: list[Outcome] = []
        outcomes: list[Outcome] = []
        running: list[Job] = []
        generation_s = 0.0
        for unit_ids, work in [*units, ([], None)]:
            claimed = self._commit_and_claim(outcomes, unit_ids, worker)
            if outcomes:
                self._tell("finished", running, outcomes, generation_s=generation_s)
                written += outcomes
            if work is None:
                break
            held = {job.id for job in claimed}
            # A job cancelled since the flush began is not claimed, and does not run.
            skipped = [i for i in unit_ids if i not in held]
            self._tell("claimed", claimed, skipped=skipped, worker=worker)
            started = time.perf_counter()
            outcomes, running = work(claimed), claimed
            generation_s = time.perf_counter() - started
            log.debug("%d jobs in %.1f ms", len(claimed), 1000 * generation_s)
        return written

    def _commit_and_claim(
        self, outcomes: Sequence[Outcome], job_ids: Sequence[uuid.UUID], worker: str
    ) -> list[Job]:
        """Write ``outcomes`` and claim ``job_ids`` in one transaction; return the claimed jobs."""
        if not outcomes and not job_ids:
            return []
        with self.sessions.begin() as session:
            finish_jobs(session, outcomes=outcomes)
            return claim_jobs(session, job_ids=job_ids, worker=worker) if job_ids else []

    def _tell(self, event: str, *args: object, **kwargs: object) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, event)(*args, **kwargs)
            except Exception:
                # Monitoring is never a reason to lose or fail a batch.
                log.exception("batch listener %r failed on %s", listener, event)

    def plan(
        self, jobs: Sequence[Job]
    ) -> tuple[list[GenerationRequest], list[tuple[Job, Exception]]]:
        """Tokenize ``jobs``; return their requests, and the jobs refused before generating."""
        requests: list[GenerationRequest] = []
        rejected: list[tuple[Job, Exception]] = []
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
                rejected.append((job, exc))
            else:
                requests.append(request)
        return requests, rejected

    def _refuse(self, errors: dict[uuid.UUID, Exception], claimed: list[Job]) -> list[Outcome]:
        return [self._failed(job.id, job.attempts, errors[job.id], None) for job in claimed]

    def _generate(self, group: list[GenerationRequest], claimed: list[Job]) -> list[Outcome]:
        attempts = {str(job.id): job.attempts for job in claimed}
        live = [request for request in group if request.key in attempts]
        outcomes = []
        for request, result in self._run_group(live):
            job_id, attempt = uuid.UUID(request.key), attempts[request.key]
            if isinstance(result, Exception):
                outcomes.append(self._failed(job_id, attempt, result, len(request.prompt_ids)))
            else:
                outcomes.append(
                    Outcome(
                        job_id=job_id,
                        attempt=attempt,
                        status=JobStatus.SUCCEEDED,
                        choices=result.choices,
                        prompt_tokens=result.prompt_tokens,
                    )
                )
        return outcomes

    def _run_group(
        self, group: list[GenerationRequest]
    ) -> list[tuple[GenerationRequest, GenerationResult | Exception]]:
        if not group:
            return []
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
    def _failed(
        job_id: uuid.UUID, attempt: int, exc: BaseException, prompt_tokens: int | None
    ) -> Outcome:
        return Outcome(
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.FAILED,
            prompt_tokens=prompt_tokens,
            error=error_dict(exc),
        )

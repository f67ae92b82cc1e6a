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
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from completion_queue.errors import ContextLengthExceeded, FatalModelError
from db.jobs import Job, Outcome, claim_jobs, finish_jobs, get_unfinished_jobs
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


class BatchRunner:
    """Runs flushes of job ids against one resident model and one database."""

    def __init__(
        self, runtime: ModelRuntime, sessions: sessionmaker[Session], *, max_rows: int
    ) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.max_rows = max_rows

    def run(self, job_ids: Sequence[str], *, worker: str) -> list[Outcome]:
        """Run every unfinished job among ``job_ids``; return the outcomes written."""
        with self.sessions() as session:
            jobs = get_unfinished_jobs(session, job_ids=[uuid.UUID(i) for i in job_ids])
        if not jobs:
            return []
        requests, rejected = self.plan(jobs)
        outcomes: list[Outcome] = []
        if rejected:
            attempts = self._commit_and_claim([], [job.id for job, _ in rejected], worker)
            outcomes = [
                self._failed(job.id, attempts[str(job.id)], exc, None)
                for job, exc in rejected
                if str(job.id) in attempts
            ]
        written: list[Outcome] = []
        for group in plan_groups(requests, max_rows=self.max_rows):
            started = time.perf_counter()
            attempts = self._commit_and_claim(outcomes, [uuid.UUID(r.key) for r in group], worker)
            written += outcomes
            # A job cancelled since the flush began is not claimed, and does not run.
            live = [r for r in group if r.key in attempts]
            claimed_at = time.perf_counter()
            outcomes = self._generate(live, attempts)
            log.debug(
                "group of %d jobs (%d rows): database %.1f ms, generate %.1f ms",
                len(live), sum(r.n for r in live), 1000 * (claimed_at - started),
                1000 * (time.perf_counter() - claimed_at),
            )  # fmt: skip
        self._commit_and_claim(outcomes, [], worker)
        return written + outcomes

    def _commit_and_claim(
        self, outcomes: Sequence[Outcome], job_ids: Sequence[uuid.UUID], worker: str
    ) -> dict[str, int]:
        """Write ``outcomes`` and claim ``job_ids`` in one transaction; return attempts by id."""
        with self.sessions.begin() as session:
            finish_jobs(session, outcomes=outcomes)
            claimed = claim_jobs(session, job_ids=job_ids, worker=worker) if job_ids else []
        return {str(job.id): job.attempts for job in claimed}

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

    def _generate(self, group: list[GenerationRequest], attempts: dict[str, int]) -> list[Outcome]:
        outcomes = []
        for request, result in self._run_group(group):
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

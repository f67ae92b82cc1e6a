"""One flush of messages, start to end: plan groups, then claim, generate and commit each.

A flush holds up to ``batch_size * batch_lookahead`` jobs. They are read once,
ordered by token budget and prompt length, and cut into groups of at most
``batch_size`` rows. Each group is claimed (marked running) just before it runs,
and its results are committed in the same transaction that claims the next
group: one transaction per group.

Faults the runner absorbs, each without losing or doubling a job:

- An unreachable database (connection refused, SQLite file locked or read-only)
  is retried with doubling backoff (tenacity) for up to ``CQ_DB_RETRY_S``; only then does
  the batch give up, and its messages go back to the queue. The results of a
  finished group are held in memory meanwhile and committed when the database
  returns, before the messages are acknowledged.
- Out of memory in ``generate`` splits the group in halves, down to single
  jobs, before any job fails; any other error reruns the group job by job.
- A job past ``CQ_JOB_TIMEOUT_S`` fails with ``GenerationTimeout``.
- A job still queued past its deadline is not claimed: it fails with
  ``DeadlineExceeded`` (``BatchExpired``, a batch line) in the claim's own
  transaction, and never runs.
- A job claimed twice without finishing runs alone, after the rest of its flush;
  claimed ``CQ_MAX_ATTEMPTS`` times (its worker died each time), it fails with
  ``AttemptsExceeded`` instead of running again. A job that kills its worker every
  time so fails alone, and its batch-mates succeed on their third attempt.
- A job for another model than the one this worker serves (a message sent to the
  wrong queue by hand, or by a version whose queue names were not one per model)
  never runs here: it is sent to its own model's queue, or fails with
  ``WrongModel`` if that queue is this one.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from completion_queue import (
    DEADLINE_ERRORS,
    AttemptsExceeded,
    ContextLengthExceeded,
    FatalModelError,
    OutOfMemory,
    WrongModel,
    queue_name,
)
from db import (
    Choice,
    Job,
    JobStatus,
    Outcome,
    claim_jobs,
    error_dict,
    fail_attempts,
    fail_past_deadline,
    finish_jobs,
    get_unfinished_jobs,
)
from engine import Engine, GeneratedChoice, GenerationRequest, GenerationResult, render_chat
from workers.interactive import Interjection, Offers
from workers.isolation import Isolation
from workers.listeners import BatchListener
from workers.planner import fit_context, plan_groups
from workers.progress import ProgressWriter, Watch
from workers.prompts import to_request
from workers.retry import retry_database

log = logging.getLogger(__name__)

#: What a unit of a flush does with its claimed jobs: their outcomes.
Work = Callable[[list[Job]], list[Outcome]]

#: A unit of a flush: its job ids, its work (None: the flush's last commit), and whether it
#: must have the engine alone (see workers.isolation).
Unit = tuple[list[uuid.UUID], Work | None, bool]

T = TypeVar("T")

#: A job claimed this many times without finishing (its worker died under it each time)
#: runs alone: one crash may be bad luck, but a job that crashes its worker every time
#: must not take its batch-mates to ``CQ_MAX_ATTEMPTS`` with it.
SUSPECT_AFTER_ATTEMPTS = 2


def cancelled(outcomes: list[Outcome], cancelled_late: frozenset[uuid.UUID]) -> list[Outcome]:
    """``outcomes``, those written cancelled (a cancel came after the worker's last look)
    marked so: their task events and metrics say cancelled, as their rows do."""
    if not cancelled_late:
        return outcomes
    return [
        replace(o, status=JobStatus.CANCELLED) if o.job_id in cancelled_late else o
        for o in outcomes
    ]


class ClaimGate:
    """Lets a flush claim its units until the main process closes it (the worker leaves),
    or asks the running flush to hand back the rest once (the worker holds more than its
    share: see :mod:`workers.dispatch`).

    Made before the pool forks. The model process claims each unit holding the lock;
    the main process closes the gate holding it too, so once :meth:`close` returns,
    every claim this worker will ever make of its flush is committed: a row of the
    flush still ``queued`` then is never started here, and its message may go back
    at once.
    """

    def __init__(self) -> None:
        self._lock = multiprocessing.Lock()
        self._closed = multiprocessing.Event()
        self._once = multiprocessing.Event()

    @contextmanager
    def claiming(self, *, first: bool = False) -> Iterator[bool]:
        """Hold the gate for one claim; yield True while it is open. A flush's ``first``
        claim ignores a hand back asked (each flush runs at least one group)."""
        with self._lock:
            yield not self._closed.is_set() and (first or not self._once.is_set())

    def hand_back_once(self) -> None:
        """Ask the running flush to claim nothing more: it ends after the unit it runs and
        reports the rest as not started (their messages go back when it returns)."""
        self._once.set()

    def next_flush(self) -> None:
        """A flush begins: a hand back asked of an earlier one does not apply to it."""
        self._once.clear()

    def close(self, timeout_s: float) -> bool:
        """Close the gate; True if no claim was in flight (the lock was had in time)."""
        had = self._lock.acquire(timeout=timeout_s)
        self._closed.set()
        if had:
            self._lock.release()
        return had

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed.is_set()


@dataclass(frozen=True)
class Flush:
    """What a flush did: the outcomes it wrote, and the jobs it handed back unstarted."""

    outcomes: list[Outcome]
    handed_back: list[str]


class BatchRunner:
    """Runs flushes of job ids against one resident model and one database."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        *,
        max_rows: int,
        listeners: Sequence[BatchListener] = (),
        job_timeout_s: float | None = None,
        max_attempts: int = 5,
        db_retry_s: float = 0.0,
        model: str | None = None,
        forward: Callable[[Sequence[Job]], object] | None = None,
        progress: ProgressWriter | None = None,
        prefix_tokens: int = 0,
        isolation: Isolation | None = None,
        gate: ClaimGate | None = None,
        offers: Offers | None = None,
    ) -> None:
        """``model`` is the model served (None: whatever a job asks for, in unit tests);
        ``forward`` sends jobs for other models to their own queues; ``progress``
        shows running jobs' output in their rows and stops cancelled ones; jobs whose
        prompts start with the same ``prefix_tokens`` tokens are grouped together;
        ``isolation``: flushes run side by side, and a suspect job's unit waits to run
        alone (the vLLM engine); ``gate``: when it is closed (or a hand back is asked)
        before a unit is claimed, the flush stops there and reports the jobs it did not
        start; ``offers``: the interactive jobs the main process hands to the running
        flush, run between two decoding steps (see :mod:`workers.interactive`)."""
        self.engine = engine
        self.sessions = sessions
        self.max_rows = max_rows
        self.listeners = list(listeners)
        self.job_timeout_s = job_timeout_s
        self.max_attempts = max_attempts
        self.db_retry_s = db_retry_s
        self.model = model
        self.forward = forward
        self.progress = progress
        self.prefix_tokens = prefix_tokens
        self.isolation = isolation
        self.gate = gate
        self.offers = offers
        # Flushes may run in several threads (the vLLM engine): listeners see one at a time.
        self._tell_lock = threading.Lock()
        #: The running flush's interjection (offers only come with the static engine,
        #: whose flushes run one at a time).
        self._between: Interjection | None = None

    def run(self, job_ids: Sequence[str], *, worker: str) -> list[Outcome]:
        """Run every unfinished job among ``job_ids``; return the outcomes written."""
        return self.run_flush(job_ids, worker=worker).outcomes

    def run_flush(self, job_ids: Sequence[str], *, worker: str) -> Flush:
        """Run the unfinished jobs among ``job_ids`` unit by unit, until :attr:`gate` closes;
        return the outcomes written and the jobs not started (still queued)."""
        ids = []
        for job_id in job_ids:
            try:
                ids.append(uuid.UUID(job_id))
            except ValueError:
                # Not a message of ours: it fails alone (acknowledged with its flush).
                log.error("dropping a message whose task id %r is not a job id", job_id[:80])
        if self.gate is not None:
            self.gate.next_flush()
        jobs = self._route(self._with_database(lambda: self._read(ids)))
        if not jobs:
            self._tell("claimed", [], skipped=ids, worker=worker)
            if self.offers is None:
                return Flush([], [])
        units = self._units(jobs) if jobs else []
        written: list[Outcome] = []
        outcomes: list[Outcome] = []
        running: list[Job] = []
        handed_back: list[uuid.UUID] = []
        generation_s = 0.0
        units.append(([], None, False))  # the last commit
        offered: set[uuid.UUID] = set()
        last_offered = False  # after a unit of offered jobs, one of the flush's own runs
        # Offered calls also run between two steps of a group (see workers.interactive).
        interjected: list[Outcome] = []
        later: list[Unit] = []
        interjection = None
        if self.offers is not None:
            run = partial(
                self._interject,
                worker=worker,
                written=interjected,
                handed_back=handed_back,
                later=later,
            )
            interjection = Interjection(self.offers, run)
        # Each flush sets its own: the units' watches call it (see _generate).
        self._between = interjection
        index = -1
        while True:
            index += 1
            unit_ids, work, alone = units[index]
            if self.offers is not None:
                taken = [] if last_offered else self.offers.take()
                if work is None and not taken:
                    # The last look: take no more offers; what came meanwhile runs here, or
                    # goes back unstarted right after a unit of offered jobs.
                    taken = self.offers.take(close=True)
                    if last_offered:
                        handed_back += [uuid.UUID(i) for i in taken]
                        taken = []
                if taken:
                    more = self._offered(taken)
                    offered.update(i for ids_, _, _ in more for i in ids_)
                    units[index:index] = more
                    index -= 1
                    continue
            # A unit waits for its turn at the engine before its jobs are claimed: a job
            # claimed while a suspect ran would gain an attempt from that suspect's crash.
            with self._turn(None if work is None else alone):
                with self._claiming(first=index == 0) as open_:
                    if work is not None and not open_:
                        # Not claimed, so still queued: their messages go back, and the next
                        # worker to take them runs them as their first attempt.
                        handed_back += [i for ids_, _, _ in units[index:] for i in ids_]
                        if self.offers is not None:
                            handed_back += [uuid.UUID(i) for i in self.offers.take(close=True)]
                        unit_ids, work = [], None
                    claimed, cancelled_late = self._commit_and_claim(outcomes, unit_ids, worker)
                outcomes = cancelled(outcomes, cancelled_late)
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
                if interjection is not None:
                    interjection.raise_error()
                    # Suspects among the calls offered meanwhile run next, alone.
                    units[index + 1 : index + 1] = later
                    later.clear()
                last_offered = not offered.isdisjoint(unit_ids)
                generation_s = time.perf_counter() - started
            log.debug("%d jobs in %.1f ms", len(claimed), 1000 * generation_s)
        if handed_back:
            log.info("handing back %d job(s) of this flush, not started", len(handed_back))
        return Flush(written + interjected, [str(i) for i in handed_back])

    def _interject(
        self,
        job_ids: list[str],
        *,
        worker: str,
        written: list[Outcome],
        handed_back: list[uuid.UUID],
        later: list[Unit],
    ) -> None:
        """Run the offered ``job_ids`` now, between two steps of the running group: claim
        each unit, generate it, and commit its outcomes (see :mod:`workers.interactive`).

        A suspect's unit goes to ``later`` (it runs with the engine alone, after the group);
        with the gate closed, the jobs go to ``handed_back`` unstarted.
        """
        for unit_ids, work, alone in self._offered(job_ids):
            if alone or work is None:
                later.append((unit_ids, work, alone))
                continue
            with self._claiming(first=False) as open_:
                if not open_:
                    handed_back.extend(unit_ids)
                    continue
                claimed, _ = self._commit_and_claim([], unit_ids, worker)
            held = {job.id for job in claimed}
            skipped = [i for i in unit_ids if i not in held]
            self._tell("claimed", claimed, skipped=skipped, worker=worker)
            started = time.perf_counter()
            outcomes = work(claimed)
            generation_s = time.perf_counter() - started
            _, cancelled_late = self._commit_and_claim(outcomes, [], worker)
            outcomes = cancelled(outcomes, cancelled_late)
            self._tell("finished", claimed, outcomes, generation_s=generation_s)
            written.extend(outcomes)

    def _units(self, jobs: list[Job]) -> list[Unit]:
        """Plan ``jobs`` into units: each is claimed, run, then committed with the next
        unit's claim."""
        exhausted = [job for job in jobs if job.attempts >= self.max_attempts]
        if exhausted:
            for job in exhausted:
                log.warning(
                    "job %s claimed %d times without finishing; failing it", job.id, job.attempts
                )
            self._fail(exhausted, AttemptsExceeded(self.max_attempts))
            jobs = [job for job in jobs if job.attempts < self.max_attempts]
        requests, rejected = self.plan(jobs)
        errors = {job.id: exc for job, exc in rejected}
        # Jobs refused before generating (too long for the context) come first and fail at once.
        units: list[Unit] = []
        if errors:
            units.append((list(errors), partial(self._refuse, errors), False))
        attempts = {str(job.id): job.attempts for job in jobs}
        trusted = [r for r in requests if attempts[r.key] < SUSPECT_AFTER_ATTEMPTS]
        # Interactive calls first, grouped apart from batch lines (a short group of their own).
        batch = {str(job.id) for job in jobs if job.lane == "batch"}
        for in_batch in (False, True):
            lane = [r for r in trusted if (r.key in batch) is in_batch]
            plan = plan_groups(lane, max_rows=self.max_rows, prefix_tokens=self.prefix_tokens)
            for group in plan:
                units.append(
                    ([uuid.UUID(r.key) for r in group], partial(self._generate, group), False)
                )
        # A job whose workers died under it twice may be what kills them: it runs alone, after
        # the rest, fewest deaths first, so another crash takes no batch-mate with it.
        suspects = [r for r in requests if attempts[r.key] >= SUSPECT_AFTER_ATTEMPTS]
        for request in sorted(suspects, key=lambda r: attempts[r.key]):
            units.append(([uuid.UUID(request.key)], partial(self._generate, [request]), True))
        return units

    def _offered(self, job_ids: list[str]) -> list[Unit]:
        """Read and plan the jobs offered to this flush (interactive calls that came in)."""
        ids = [uuid.UUID(job_id) for job_id in job_ids]
        return self._units(self._route(self._with_database(lambda: self._read(ids))))

    def _turn(self, alone: bool | None) -> AbstractContextManager[None]:
        """The engine for one unit: shared with other flushes' units, or alone (a suspect).

        None: no unit (the flush's last commit), which waits for nothing.
        """
        if self.isolation is None or alone is None:
            return nullcontext()
        return self.isolation.alone() if alone else self.isolation.shared()

    def _claiming(self, *, first: bool) -> AbstractContextManager[bool]:
        """Hold the gate while a unit is claimed; yield whether claiming is still open."""
        return nullcontext(True) if self.gate is None else self.gate.claiming(first=first)

    def _read(self, job_ids: Sequence[uuid.UUID]) -> list[Job]:
        with self.sessions() as session:
            return get_unfinished_jobs(session, job_ids=job_ids)

    def _fail(self, jobs: Sequence[Job], exc: Exception) -> None:
        """Fail ``jobs`` with ``exc`` before they run (fenced on their attempts)."""
        error = error_dict(exc)

        def transaction() -> None:
            with self.sessions.begin() as session:
                fail_attempts(session, jobs=[(job.id, job.attempts) for job in jobs], error=error)

        self._with_database(transaction)

    def _route(self, jobs: list[Job]) -> list[Job]:
        """Keep the jobs for the model served; send the others to their own model's queue.

        The messages in hand are acknowledged with the flush, after the new ones are
        sent; if sending fails, it raises and the whole flush goes back to the queue.
        """
        served = self.model
        if served is None or all(job.model == served for job in jobs):
            return jobs
        strays = [job for job in jobs if job.model != served]
        movable: list[Job] = []
        if self.forward is not None:
            movable = [job for job in strays if queue_name(job.model) != queue_name(served)]
            if movable:
                log.warning(
                    "%d job(s) for other models reached %s; sending them on", len(movable), served
                )
                self.forward(movable)
        moved = {job.id for job in movable}
        for job in strays:
            if job.id not in moved:
                self._fail([job], WrongModel(job.model, served))
        return [job for job in jobs if job.model == served]

    def _commit_and_claim(
        self, outcomes: Sequence[Outcome], job_ids: Sequence[uuid.UUID], worker: str
    ) -> tuple[list[Job], frozenset[uuid.UUID]]:
        """Write ``outcomes`` and claim ``job_ids`` in one transaction.

        Return the claimed jobs, and the jobs among ``outcomes`` written cancelled: a
        cancel came after the worker's last look at them.
        """
        if not outcomes and not job_ids:
            return [], frozenset()

        def transaction() -> tuple[list[Job], frozenset[uuid.UUID]]:
            with self.sessions.begin() as session:
                finished = finish_jobs(session, outcomes=outcomes)
                claimed = claim_jobs(session, job_ids=job_ids, worker=worker) if job_ids else []
                if len(claimed) < len(job_ids):
                    # Those left queued past their deadline fail here and never run.
                    taken = {job.id for job in claimed}
                    missed = [i for i in job_ids if i not in taken]
                    fail_past_deadline(session, errors=DEADLINE_ERRORS, job_ids=missed)
                return claimed, finished.cancelled_late

        return self._with_database(transaction)

    def _with_database(self, work: Callable[[], T]) -> T:
        return retry_database(work, within_s=self.db_retry_s)

    def _tell(self, event: str, *args: object, **kwargs: object) -> None:
        with self._tell_lock:
            self._tell_each(event, *args, **kwargs)

    def _tell_each(self, event: str, *args: object, **kwargs: object) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, event)(*args, **kwargs)
            except Exception:
                # Monitoring is never a reason to lose or fail a batch.
                log.exception("batch listener %r failed on %s", listener, event)

    def plan(
        self, jobs: Sequence[Job]
    ) -> tuple[list[GenerationRequest], list[tuple[Job, Exception]]]:
        """Tokenize ``jobs``; return their requests, and the jobs refused before generating.

        A prompt too long for the context is refused, or cut to its last tokens when
        its job asks for ``truncate`` (see :func:`workers.planner.fit_context`).
        """
        requests: list[GenerationRequest] = []
        rejected: list[tuple[Job, Exception]] = []
        prompts: list[str] = []
        for job in jobs:
            try:
                prompts.append(self._prompt(job))
            except Exception as exc:  # NoChatTemplate, or a template that raises
                rejected.append((job, exc))
        refused = {job.id for job, _ in rejected}
        jobs = [job for job in jobs if job.id not in refused]
        try:
            encoded = self.engine.encode(prompts)
        except Exception:
            # A prompt the tokenizer cannot take fails alone, never its batch (which would
            # otherwise be requeued and fail again for ever): encode them one by one.
            encoded, encodable = [], []
            for job, prompt in zip(jobs, prompts, strict=True):
                try:
                    encoded.append(self.engine.encode([prompt])[0])
                except Exception as exc:
                    log.error("job %s: its prompt cannot be tokenized: %r", job.id, exc)
                    rejected.append((job, exc))
                else:
                    encodable.append(job)
            jobs = encodable
        for job, prompt_ids in zip(jobs, encoded, strict=True):
            request = to_request(job, prompt_ids)
            try:
                kept, dropped = fit_context(
                    prompt_ids,
                    max_new_tokens=request.max_new_tokens,
                    context_length=self.engine.context_length,
                    truncate=bool(job.params.get("truncate", False)),
                )
            except ContextLengthExceeded as exc:
                rejected.append((job, exc))
            else:
                requests.append(replace(request, prompt_ids=kept, truncated_prompt_tokens=dropped))
        return requests, rejected

    def _prompt(self, job: Job) -> str:
        if job.messages is None:
            return job.prompt
        return render_chat(self.engine.tokenizer, job.messages, model=job.model)

    def _refuse(self, errors: dict[uuid.UUID, Exception], claimed: list[Job]) -> list[Outcome]:
        return [self._failed(job.id, job.attempts, errors[job.id], None) for job in claimed]

    def _generate(self, group: list[GenerationRequest], claimed: list[Job]) -> list[Outcome]:
        attempts = {str(job.id): job.attempts for job in claimed}
        live = [request for request in group if request.key in attempts]
        watch = self.progress.watch(claimed) if self.progress is not None and live else None
        if watch is not None:
            watch.between = self._between
        outcomes = []
        for request, result in self.generate_group(live, watch):
            job_id, attempt = uuid.UUID(request.key), attempts[request.key]
            if isinstance(result, Exception):
                outcomes.append(self._failed(job_id, attempt, result, len(request.prompt_ids)))
            else:
                # A job cancelled while it ran keeps what it generated up to the cancel.
                stopped = watch is not None and request.key in watch.stopped
                outcomes.append(
                    Outcome(
                        job_id=job_id,
                        attempt=attempt,
                        status=JobStatus.CANCELLED if stopped else JobStatus.SUCCEEDED,
                        choices=[stored(choice) for choice in result.choices],
                        prompt_tokens=result.prompt_tokens,
                        truncated_prompt_tokens=request.truncated_prompt_tokens or None,
                    )
                )
        if watch is not None:
            self._tell("first_tokens", claimed, watch.first_token_at)
        return outcomes

    def generate_group(
        self, group: list[GenerationRequest], watch: Watch | None = None
    ) -> list[tuple[GenerationRequest, GenerationResult | Exception]]:
        """Generate ``group``; each request gets its result, or the error that fails it alone.

        Out of memory halves the group, down to single jobs, before any job fails;
        another error reruns the group job by job, so one bad job fails alone. A
        fatal model error is raised.
        """
        if not group:
            return []
        try:
            results = self.engine.generate(group, timeout_s=self.job_timeout_s, watch=watch)
            return list(zip(group, results, strict=True))
        except FatalModelError:
            raise
        except Exception as exc:
            if len(group) == 1:
                log.warning("job %s failed: %s", group[0].key, exc)
                return [(group[0], exc)]
            if isinstance(exc, OutOfMemory):
                # A smaller batch may fit: halve it, down to single jobs, before anyone fails.
                half = len(group) // 2
                log.warning("group of %d ran out of memory; retrying it in halves", len(group))
                return self.generate_group(group[:half], watch) + self.generate_group(
                    group[half:], watch
                )
            # One bad job must not fail its batch-mates: find it by running them alone.
            log.warning("group of %d failed (%s); retrying its jobs one by one", len(group), exc)
            return [pair for request in group for pair in self.generate_group([request], watch)]

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


def stored(choice: GeneratedChoice) -> Choice:
    """Return an engine's choice as the row stores it."""
    return Choice(
        text=choice.text,
        finish_reason=choice.finish_reason,
        completion_tokens=choice.completion_tokens,
        logprobs=choice.logprobs,
    )

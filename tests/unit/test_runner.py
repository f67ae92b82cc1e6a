"""The runner's logic against a stand-in runtime: context fitting, out-of-memory halving,
DB retries; the rows are real, in SQLite."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from completion_queue import ContextLengthExceeded, ModelError, OutOfMemory
from db import (
    Job,
    JobStatus,
    NewJob,
    Outcome,
    cancel_job,
    create_jobs,
    get_job,
    make_engine,
    make_session_factory,
    upgrade,
)
from engine import GeneratedChoice, GenerationRequest, GenerationResult
from tests.factories import make_job
from workers.interactive import LOCK_WAIT_S, Interjection, Offers
from workers.listeners import BatchListener
from workers.retry import retry_database
from workers.runner import BatchRunner, Flush


class FittingRuntime:
    """Runs out of memory above ``fits`` rows; records the size of every call."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.calls: list[int] = []

    def generate(self, group: Sequence[GenerationRequest], **_: Any) -> list[str]:
        rows = sum(r.n for r in group)
        self.calls.append(rows)
        if rows > self.fits:
            raise OutOfMemory(f"{rows} rows do not fit")
        return [r.key for r in group]


def requests(count: int, n: int = 1) -> list[GenerationRequest]:
    return [
        GenerationRequest(key=str(i), prompt_ids=(1,), max_new_tokens=4, n=n) for i in range(count)
    ]


def runner(runtime: object, **kwargs: Any) -> BatchRunner:
    return BatchRunner(runtime, None, max_rows=64, **kwargs)  # type: ignore[arg-type]


def test_out_of_memory_halves_the_group_down_to_what_fits() -> None:
    runtime = FittingRuntime(fits=2)
    results = runner(runtime).generate_group(requests(8))
    assert [result for _, result in results] == [str(i) for i in range(8)]
    assert runtime.calls == [8, 4, 2, 2, 4, 2, 2]


def test_out_of_memory_fails_only_a_job_that_does_not_fit_alone() -> None:
    runtime = FittingRuntime(fits=2)
    group = [*requests(2), GenerationRequest(key="big", prompt_ids=(1,), max_new_tokens=4, n=3)]
    results = dict((r.key, result) for r, result in runner(runtime).generate_group(group))
    assert results["0"] == "0" and results["1"] == "1"
    assert isinstance(results["big"], OutOfMemory)


def test_other_errors_rerun_the_group_job_by_job() -> None:
    class Poisoned(FittingRuntime):
        def generate(self, group: Sequence[GenerationRequest], **_: Any) -> list[str]:
            self.calls.append(len(group))
            if any(r.key == "2" for r in group):
                raise ModelError("poison")
            return [r.key for r in group]

    runtime = Poisoned(fits=99)
    results = runner(runtime).generate_group(requests(4))
    assert runtime.calls == [4, 1, 1, 1, 1]
    assert [isinstance(result, ModelError) for _, result in results] == [False, False, True, False]


def test_database_errors_are_retried_until_the_deadline() -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))
        return "committed"

    assert retry_database(flaky, within_s=30) == "committed"
    assert len(attempts) == 3
    with pytest.raises(OperationalError):
        retry_database(
            lambda: (_ for _ in ()).throw(OperationalError("x", {}, Exception("down"))),
            within_s=0,
        )
    with pytest.raises(ValueError):
        retry_database(lambda: int("not a number"), within_s=30)


class WordRuntime:
    """One token per word (its length), a context of 16 tokens; echoes the prompt's size."""

    context_length = 16

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [[len(word) for word in prompt.split()] for prompt in prompts]

    def generate(self, group: Sequence[GenerationRequest], **_: Any) -> list[GenerationResult]:
        return [
            GenerationResult([GeneratedChoice("ok", "length", r.max_new_tokens)], len(r.prompt_ids))
            for r in group
        ]


def job(prompt: str, **params: object) -> Job:
    return make_job(prompt, params=params)


def test_plan_truncates_only_the_jobs_that_ask_for_it() -> None:
    # Given three jobs: one fits, two are 20 + 4 tokens for a context of 16
    long = " ".join("a" * (i % 9 + 1) for i in range(20))
    fits = job("one two three", max_new_tokens=4)
    cut = job(long, max_new_tokens=4, truncate=True)
    refused = job(long, max_new_tokens=4)
    # When the runner plans them
    requests, rejected = runner(WordRuntime()).plan([fits, cut, refused])
    # Then the one asking for truncation keeps its last 12 tokens, and the other is refused
    by_key = {r.key: r for r in requests}
    assert set(by_key) == {str(fits.id), str(cut.id)}
    assert by_key[str(fits.id)].prompt_ids == (3, 3, 5)
    assert by_key[str(fits.id)].truncated_prompt_tokens == 0
    assert by_key[str(cut.id)].prompt_ids == tuple(i % 9 + 1 for i in range(8, 20))
    assert by_key[str(cut.id)].truncated_prompt_tokens == 8
    assert [(j.id, type(e)) for j, e in rejected] == [(refused.id, ContextLengthExceeded)]
    assert "truncate: true would keep the prompt's last 12 tokens" in str(rejected[0][1])


def sqlite_sessions(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'runner.db'}"
    upgrade(url)
    return make_session_factory(make_engine(url))


def test_a_truncated_job_records_what_was_dropped(tmp_path: Path) -> None:
    # Given a job too long for the context that asks for truncation, and a short one
    sessions = sqlite_sessions(tmp_path)
    long = " ".join(["word"] * 30)
    new = [
        NewJob(model="m", prompt=long, params={"max_new_tokens": 4, "truncate": True}),
        NewJob(model="m", prompt="short", params={"max_new_tokens": 4}),
    ]
    with sessions.begin() as session:
        create_jobs(session, jobs=new)
    # When a runner runs them
    BatchRunner(WordRuntime(), sessions, max_rows=64).run([str(j.id) for j in new], worker="w")
    # Then 30 tokens for a context of 16 with 4 new: 12 kept, 18 dropped; the short one untouched
    with sessions() as session:
        rows = [get_job(session, job_id=j.id) for j in new]
    recorded = [(r.status, r.prompt_tokens, r.truncated_prompt_tokens) for r in rows if r]
    assert recorded == [(JobStatus.SUCCEEDED, 12, 18), (JobStatus.SUCCEEDED, 1, None)]


def test_a_message_that_is_not_a_job_fails_alone(tmp_path: Path) -> None:
    # Given a flush holding a task id that is not a job id, and a real job
    sessions = sqlite_sessions(tmp_path)
    job = NewJob(model="m", prompt="short", params={"max_new_tokens": 4})
    with sessions.begin() as session:
        create_jobs(session, jobs=[job])
    # When the runner runs the flush
    outcomes = BatchRunner(WordRuntime(), sessions, max_rows=64).run(
        ["not-a-uuid", str(job.id)], worker="w"
    )
    # Then the stray message is dropped and the job succeeds
    assert [(o.job_id, o.status) for o in outcomes] == [(job.id, JobStatus.SUCCEEDED)]


def test_jobs_for_other_models_are_sent_on_and_never_run_here(tmp_path: Path) -> None:
    # Given a flush with a job for the served model and two for others: "a_b" has its own
    # queue, and a runner that cannot send on (no forward) for the second run
    sessions = sqlite_sessions(tmp_path)
    models = ["m", "a_b", "a b"]
    new = [NewJob(model=m, prompt="short", params={"max_new_tokens": 4}) for m in models]
    with sessions.begin() as session:
        create_jobs(session, jobs=new)
    sent: list[Job] = []
    # When a worker of "m" runs the flush
    outcomes = BatchRunner(
        WordRuntime(), sessions, max_rows=64, model="m", forward=sent.extend
    ).run([str(j.id) for j in new], worker="w")
    # Then only its own job ran; the others went on to their own queues, still queued
    assert [o.job_id for o in outcomes] == [new[0].id]
    assert sorted(job.model for job in sent) == ["a b", "a_b"]
    with sessions() as session:
        rows = [get_job(session, job_id=j.id) for j in new[1:]]
    assert [row.status for row in rows if row] == [JobStatus.QUEUED] * 2
    # And a worker that cannot send them on fails them, naming both models
    BatchRunner(WordRuntime(), sessions, max_rows=64, model="m").run([str(new[1].id)], worker="w")
    with sessions() as session:
        failed = get_job(session, job_id=new[1].id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error and "'a_b'" in failed.error["message"] and "'m'" in failed.error["message"]


class Finishes(BatchListener):
    """Records the status of every outcome it is told of."""

    def __init__(self) -> None:
        self.statuses: dict[str, JobStatus] = {}

    def finished(self, jobs: Sequence[Job], outcomes: Sequence[Outcome], **_: Any) -> None:
        self.statuses.update({o.job_id.hex: o.status for o in outcomes})


def test_a_job_cancelled_after_the_last_look_is_reported_cancelled(tmp_path: Path) -> None:
    # Given two jobs, one of them cancelled while the batch runs, after any look at it
    sessions = sqlite_sessions(tmp_path)
    new = [NewJob(model="m", prompt=f"p {i}", params={"max_new_tokens": 4}) for i in range(2)]
    with sessions.begin() as session:
        create_jobs(session, jobs=new)

    class CancellingRuntime(WordRuntime):
        def generate(self, group: Sequence[GenerationRequest], **kw: Any) -> list[Any]:
            with sessions.begin() as session:
                cancel_job(session, job_id=new[1].id)
            return super().generate(group, **kw)

    # When the runner writes the batch
    told = Finishes()
    outcomes = BatchRunner(CancellingRuntime(), sessions, max_rows=64, listeners=[told]).run(
        [str(j.id) for j in new], worker="w"
    )
    # Then the row, the outcomes returned and what the listeners heard all say cancelled
    with sessions() as session:
        rows = [get_job(session, job_id=j.id) for j in new]
    assert [r.status for r in rows if r] == [JobStatus.SUCCEEDED, JobStatus.CANCELLED]
    assert [o.status for o in outcomes] == [JobStatus.SUCCEEDED, JobStatus.CANCELLED]
    assert told.statuses == {new[0].id.hex: JobStatus.SUCCEEDED, new[1].id.hex: JobStatus.CANCELLED}
    # and it keeps the tokens it made
    assert rows[1] is not None and rows[1].completion_tokens == 4


class PickyRuntime(WordRuntime):
    """Fails a whole batch that holds a prompt with 'bad' in it, as a tokenizer does."""

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if any("bad" in p for p in prompts):
            raise TypeError("TextEncodeInput must be Union[...]")
        return super().encode(prompts)


def test_a_prompt_the_tokenizer_refuses_fails_alone() -> None:
    # Given a batch where one prompt makes the tokenizer raise
    ok, bad = job("one two", max_new_tokens=2), job("a bad one", max_new_tokens=2)
    # When the runner plans it
    requests, rejected = runner(PickyRuntime()).plan([ok, bad])
    # Then only that job is refused; its batch-mate is planned
    assert [r.key for r in requests] == [str(ok.id)]
    assert [(j.id, type(e)) for j, e in rejected] == [(bad.id, TypeError)]


class OfferingRuntime(WordRuntime):
    """Records each group's prompts; while the group holding prompt P runs, offers the jobs
    ``offer_on[P]`` to the flush (as the main process does when interactive calls come in)."""

    def __init__(self, offers: Offers, jobs: Sequence[NewJob], offer_on: dict[str, str]) -> None:
        self.offers, self.offer_on = offers, offer_on
        self.prompts = {str(j.id): j.prompt for j in jobs}
        self.ids = {j.prompt: str(j.id) for j in jobs}
        self.groups: list[list[str]] = []

    def generate(self, group: Sequence[GenerationRequest], **kw: Any) -> list[GenerationResult]:
        self.groups.append(sorted(self.prompts[r.key] for r in group))
        for prompt in self.groups[-1]:
            if prompt in self.offer_on:
                assert self.offers.offer(self.ids[self.offer_on[prompt]])
        return super().generate(group, **kw)


def stored(tmp_path: Path, lines: int, calls: int) -> tuple[Any, list[NewJob]]:
    """Batch lines (two to a group) and interactive calls, stored queued."""
    sessions = sqlite_sessions(tmp_path)
    new = [
        NewJob(model="m", prompt=f"line {i}", params={"max_new_tokens": 4}, lane="batch")
        for i in range(lines)
    ]
    new += [
        NewJob(model="m", prompt=f"call {i}", params={"max_new_tokens": 8}) for i in range(calls)
    ]
    with sessions.begin() as session:
        create_jobs(session, jobs=new)
    return sessions, new


def statuses(sessions: Any, jobs: Sequence[NewJob]) -> dict[str, tuple[JobStatus, int]]:
    with sessions() as session:
        rows = {j.prompt: get_job(session, job_id=j.id) for j in jobs}
    return {prompt: (row.status, row.attempts) for prompt, row in rows.items() if row}


def run_with_two_calls(
    sessions: Any, new: list[NewJob], *, lines: int
) -> tuple[OfferingRuntime, Flush, Offers]:
    """Run a flush of the first ``lines`` jobs; "call 0" is offered while "line 0" runs,
    "call 1" while "call 0" runs."""
    offers = Offers()
    offers.open()
    runtime = OfferingRuntime(offers, new, {"line 0": "call 0", "call 0": "call 1"})
    flush = BatchRunner(runtime, sessions, max_rows=2, offers=offers).run_flush(
        [str(j.id) for j in new[:lines]], worker="w"
    )
    return runtime, flush, offers


def test_a_running_flush_runs_an_offered_call_at_its_next_group_boundary(tmp_path: Path) -> None:
    # Given a flush of six batch lines (three groups), and two interactive calls that come in
    # while its first group runs, then while the first call runs
    sessions, new = stored(tmp_path, lines=6, calls=2)
    # When the runner runs the flush
    runtime, flush, offers = run_with_two_calls(sessions, new, lines=6)
    # Then each call ran at the next boundary after it came, but a group of batch lines
    # ran between the two; nothing was handed back, every job ran once
    assert runtime.groups == [
        ["line 0", "line 1"],
        ["call 0"],
        ["line 2", "line 3"],
        ["call 1"],
        ["line 4", "line 5"],
    ]
    assert flush.handed_back == []
    assert statuses(sessions, new) == {j.prompt: (JobStatus.SUCCEEDED, 1) for j in new}
    # and the flush takes no more offers once it returned
    assert not offers.offer(str(new[0].id))


def test_offers_stop_when_a_killed_flush_left_their_lock_held() -> None:
    # Given a flush taking offers, killed while it held their lock (SIGKILL mid-drain)
    offers = Offers()
    offers.open()
    assert offers._lock.acquire(timeout=1)
    # When the main process offers an interactive call
    started = time.monotonic()
    taken = offers.offer("job-1")
    # Then it is refused within the lock's wait (the call is buffered instead), and the
    # worker's event loop goes on
    assert not taken and time.monotonic() - started < LOCK_WAIT_S + 1
    # And from then on it offers nothing, without waiting again (the lock stays held)
    started = time.monotonic()
    assert not offers.offer("job-2") and time.monotonic() - started < 0.1
    offers._lock.release()
    assert offers.take() == []


class Clock:
    """A clock the test moves; each run of offered calls takes ``run_s`` on it."""

    def __init__(self, run_s: float) -> None:
        self.now, self.run_s = 100.0, run_s
        self.runs: list[list[str]] = []

    def __call__(self) -> float:
        return self.now

    def run(self, job_ids: list[str]) -> None:
        self.runs.append(job_ids)
        self.now += self.run_s


def test_offered_calls_get_at_most_half_the_engine_while_a_group_waits() -> None:
    # Given a running group's interjection, whose offered calls take 2 s to run
    offers, clock = Offers(), Clock(run_s=2.0)
    offers.open()
    between = Interjection(offers, clock.run, clock=clock)
    # When a call is offered, it runs at the group's next step
    assert offers.offer("a")
    between()
    assert clock.runs == [["a"]]
    # Then one offered right after waits while the group takes steps for as long (2 s)
    assert offers.offer("b")
    clock.now += 1.9
    between()
    assert clock.runs == [["a"]]
    clock.now += 0.2
    between()
    assert clock.runs == [["a"], ["b"]]


def test_an_interjection_runs_nothing_inside_itself_and_keeps_its_error_for_the_flush() -> None:
    offers = Offers()
    offers.open()
    seen: list[list[str]] = []

    def run(job_ids: list[str]) -> None:
        seen.append(job_ids)
        # The offered calls' own steps call it again: it runs nothing then
        assert offers.offer("inner")
        between()
        raise OperationalError("commit", {}, Exception("database is locked"))

    between = Interjection(offers, run)
    assert offers.offer("outer")
    # The error is not the paused group's: the step goes on
    between()
    assert seen == [["outer"]]
    # and the flush raises it once the group returns; nothing more runs meanwhile
    between()
    assert seen == [["outer"]]
    with pytest.raises(OperationalError):
        between.raise_error()


def test_a_call_offered_at_the_very_end_after_another_goes_back_unstarted(
    tmp_path: Path,
) -> None:
    # Given a flush of one group, a call that comes in while it runs, and another one that
    # comes in while that call runs (the flush's last unit)
    sessions, new = stored(tmp_path, lines=2, calls=2)
    runtime, flush, _ = run_with_two_calls(sessions, new, lines=2)
    # Then the second call is handed back, never claimed (its message is buffered again)
    assert runtime.groups == [["line 0", "line 1"], ["call 0"]]
    assert flush.handed_back == [str(new[3].id)]
    assert statuses(sessions, new)["call 1"] == (JobStatus.QUEUED, 0)


def test_a_flush_plans_interactive_calls_first_in_groups_of_their_own(tmp_path: Path) -> None:
    sessions, new = stored(tmp_path, lines=3, calls=1)
    runtime = OfferingRuntime(Offers(), new, {})
    BatchRunner(runtime, sessions, max_rows=2).run([str(j.id) for j in new], worker="w")
    # The call's budget (8) is larger than the lines' (4): by budget alone it would go last.
    assert runtime.groups == [["call 0"], ["line 0", "line 1"], ["line 2"]]

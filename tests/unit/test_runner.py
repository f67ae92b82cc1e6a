"""The runner's logic against a stand-in runtime: context fitting, out-of-memory halving,
DB retries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from completion_queue.errors import ContextLengthExceeded, ModelError, OutOfMemory
from db.jobs import Choice, Job
from db.models import JobStatus
from workers.batching import GenerationRequest
from workers.model import GenerationResult
from workers.runner import BatchRunner


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
    results = runner(runtime)._run_group(requests(8))
    assert [result for _, result in results] == [str(i) for i in range(8)]
    assert runtime.calls == [8, 4, 2, 2, 4, 2, 2]


def test_out_of_memory_fails_only_a_job_that_does_not_fit_alone() -> None:
    runtime = FittingRuntime(fits=2)
    group = [*requests(2), GenerationRequest(key="big", prompt_ids=(1,), max_new_tokens=4, n=3)]
    results = dict((r.key, result) for r, result in runner(runtime)._run_group(group))
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
    results = runner(runtime)._run_group(requests(4))
    assert runtime.calls == [4, 1, 1, 1, 1]
    assert [isinstance(result, ModelError) for _, result in results] == [False, False, True, False]


def test_database_errors_are_retried_until_the_deadline() -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))
        return "committed"

    assert runner(None, db_retry_s=30)._with_database(flaky) == "committed"
    assert len(attempts) == 3
    with pytest.raises(OperationalError):
        runner(None, db_retry_s=0)._with_database(
            lambda: (_ for _ in ()).throw(OperationalError("x", {}, Exception("down")))
        )
    with pytest.raises(ValueError):
        runner(None, db_retry_s=30)._with_database(lambda: int("not a number"))


class WordRuntime:
    """One token per word (its length), a context of 16 tokens; echoes the prompt's size."""

    context_length = 16

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [[len(word) for word in prompt.split()] for prompt in prompts]

    def generate(self, group: Sequence[GenerationRequest], **_: Any) -> list[GenerationResult]:
        return [
            GenerationResult([Choice("ok", "length", r.max_new_tokens)], len(r.prompt_ids))
            for r in group
        ]


def job(prompt: str, **params: object) -> Job:
    return Job(
        id=uuid.uuid4(), status=JobStatus.RUNNING, model="m", prompt=prompt, params=params,
        choices=[], prompt_tokens=None, completion_tokens=None, error=None, attempts=1,
        worker="w", priority=0, idempotency_key=None, batch_id=None,
        created_at=datetime(2026, 1, 1, tzinfo=UTC), started_at=None, finished_at=None,
    )  # fmt: skip


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


def test_a_truncated_job_records_what_was_dropped() -> None:
    long = " ".join(["word"] * 30)
    jobs = [job(long, max_new_tokens=4, truncate=True), job("short", max_new_tokens=4)]
    batch = runner(WordRuntime())
    requests, _ = batch.plan(jobs)
    outcomes = {o.job_id: o for o in batch._generate(requests, jobs)}
    recorded = [
        (outcomes[j.id].prompt_tokens, outcomes[j.id].truncated_prompt_tokens) for j in jobs
    ]
    # 30 tokens for a context of 16 with 4 new: 12 kept, 18 dropped; the short one untouched
    assert recorded == [(12, 18), (1, None)]

"""The runner's recovery logic against a stand-in runtime: out-of-memory halving, DB retries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from completion_queue.errors import ModelError, OutOfMemory
from workers.batching import GenerationRequest
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

"""Faults inside generation, made real in the worker's model process (tests/faults/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from db import JobStatus
from tests.chaos.conftest import Chaos
from tests.reference import Reference

PROMPTS = [
    "Once upon a time",
    "The weather",
    "def add(a, b):",
    "Dear team,",
    "x",
    "Redis is",
    "The river runs",
    "She opened the door,",
]


def seven_good_and(bad_prompt: str) -> list[dict[str, Any]]:
    """Eight greedy requests: seven good ones and ``bad_prompt`` fourth."""
    requests: list[dict[str, Any]] = [
        {"prompt": p, "max_new_tokens": 8, "temperature": 0} for p in PROMPTS[:7]
    ]
    requests.insert(3, {"prompt": bad_prompt, "max_new_tokens": 8})
    return requests


def test_a_poison_job_fails_alone_and_the_worker_keeps_serving(chaos: Chaos) -> None:
    # Given a worker whose model raises on every batch that holds a poisoned prompt
    chaos.start_worker(faults={"poison": "POISON-PILL"})
    requests = seven_good_and("eat the POISON-PILL")
    with chaos.client() as client:
        # When it is in one batch with seven good jobs
        done = client.wait(client.submit_many(requests), timeout=120)
        # Then it fails on its first attempt with the error stored, and only it
        poison = done.pop(3)
        assert poison.status is JobStatus.FAILED and poison.attempts == 1
        assert poison.error is not None and poison.error["type"] == "ModelError"
        assert "POISON-PILL" in poison.error["message"] and poison.choices == []
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 7
        assert all(j.attempts == 1 for j in done)
        # and the worker goes on serving
        after = client.wait(client.submit("after", max_new_tokens=4), timeout=60)
        assert after.status is JobStatus.SUCCEEDED


def test_a_job_that_kills_its_worker_every_time_fails_alone_after_max_attempts(
    chaos: Chaos,
) -> None:
    # Given a worker whose model process dies on every batch that holds a crashing prompt
    worker = chaos.start_worker(faults={"crash": "CRASH-PILL"}, max_attempts=4)
    requests = seven_good_and("eat the CRASH-PILL")
    with chaos.client() as client:
        # When it is in one batch with seven good jobs
        done = client.wait(client.submit_many(requests), timeout=180)
        # Then it fails after CQ_MAX_ATTEMPTS claims, with the reason stored
        crasher = done.pop(3)
        assert crasher.status is JobStatus.FAILED and crasher.attempts == 4
        assert crasher.error is not None and crasher.error["type"] == "AttemptsExceeded"
        assert "CQ_MAX_ATTEMPTS" in crasher.error["message"] and crasher.choices == []
        # and its batch-mates succeed once each: two crashes beside it, then alone
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 7
        assert [j.attempts for j in done] == [3] * 7
        assert all(len(j.choices) == 1 for j in done)
        # and the worker, whose model process was replaced each time, goes on serving
        after = client.wait(client.submit("after", max_new_tokens=4), timeout=60)
        assert after.status is JobStatus.SUCCEEDED and after.attempts == 1
    assert worker.alive()
    # and each of the four replacements was let load (none killed before it came up)
    assert worker.log_text().count("exited with 'signal 9 (SIGKILL)'") == 4


def test_out_of_memory_splits_the_batch_in_halves_before_any_job_fails(
    chaos: Chaos, reference: Reference
) -> None:
    # Given a worker whose model runs out of memory above two rows
    worker = chaos.start_worker(faults={"oom_above_rows": 2})
    requests = [{"prompt": p, "max_new_tokens": 6, "temperature": 0} for p in PROMPTS]
    with chaos.client() as client:
        # When eight jobs come in one batch, and one job needs three rows alone
        done = client.wait(client.submit_many(requests), timeout=120)
        too_big = client.wait(client.submit("Hello", n=3, max_new_tokens=4), timeout=60)
    # Then the batch is retried in halves and every job succeeds, with the same text
    for request, job in zip(requests, done, strict=True):
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
        assert job.text == reference.greedy(request["prompt"], 6)[0]  # type: ignore[arg-type]
    assert "ran out of memory; retrying it in halves" in worker.log_text()
    # and only a job that does not fit alone fails, with the out-of-memory error
    assert too_big.status is JobStatus.FAILED
    assert too_big.error is not None and too_big.error["type"] == "OutOfMemory"


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_a_job_over_its_time_limit_fails_and_the_worker_keeps_serving(
    chaos: Chaos, engine: str
) -> None:
    # Given a worker whose jobs may run half a second, on a model whose steps take 10 ms
    # (so the long job's 480 steps take seconds even if all its rows could end early)
    chaos.start_worker(job_timeout_s=0.5, engine=engine, faults={"crawl_s": 0.01})
    # (the continuous engine runs greedy rows; sampled ones go to its static engine)
    sampling: dict[str, Any] = {"seed": 1} if engine == "static" else {"temperature": 0}
    with chaos.client() as client:
        # When a long job and a short one share a batch
        slow, quick = client.submit_many(
            [
                {"prompt": "story", "max_new_tokens": 480, "n": 8, **sampling},
                {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0},
            ]
        )
        slow, quick = client.wait([slow, quick], timeout=60)
        # Then the long one fails with a timeout error, the short one succeeds
        assert slow.status is JobStatus.FAILED and slow.choices == []
        assert slow.error is not None and slow.error["type"] == "GenerationTimeout"
        assert "CQ_JOB_TIMEOUT_S" in slow.error["message"]
        assert quick.status is JobStatus.SUCCEEDED
        # and the worker goes on serving
        after = client.wait(client.submit("after", max_new_tokens=4), timeout=60)
        assert after.status is JobStatus.SUCCEEDED


def test_a_worker_whose_model_cannot_load_exits_and_leaves_its_jobs_queued(
    chaos: Chaos, tmp_path: Path
) -> None:
    # Given a job for a model whose directory holds no model
    missing = tmp_path / "no-model"
    missing.mkdir()
    with chaos.client(model=str(missing)) as client:
        job = client.submit("Hello", max_new_tokens=2)
        # When a worker starts to serve it
        worker = chaos.start_worker(ready=False, model=str(missing))
        # Then it stops (a cold shutdown) with an error naming the model, not standing ready
        # without one (Celery's cold shutdown exits 0: a supervisor that restarts only on
        # failure would not start it again)
        assert worker.process is not None
        worker.process.wait(timeout=120)
        log = worker.log_text()
        assert f"could not load the model {missing}; stopping the worker" in log
        assert "Cold shutdown" in log
        # and the job waits, queued, for a worker that can load its model
        assert client.get(job.id).status is JobStatus.QUEUED

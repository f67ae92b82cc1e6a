"""A job's life on a vLLM worker whose steps take time: progress in its row, streamed
deltas, a cancel, the job time limit and a killed model process, as on the static engine.

One slowed worker serves every test here (``slow_vllm``: each engine step sleeps
``STEP_S``), so a job of a few hundred tokens runs for seconds, at the default
``CQ_PROGRESS_INTERVAL_MS`` (500 ms). The model-process kill comes last: the
replacement takes as long to start as the worker did.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from db import Job, JobStatus
from tests.conftest import until
from tests.progress import check_progress_then_result
from tests.vllm.conftest import (
    SLOW_JOB_TIMEOUT_S,
    STALL,
    VllmWorker,
    kept_tokens,
    offline_choice,
)

pytestmark = pytest.mark.timeout(600)

PROMPT = "The queue takes a job"


def greedy(offline: Any, tokens: int) -> str:
    """vLLM's own greedy text of PROMPT, which must run ``tokens`` tokens without an EOS."""
    expected = offline_choice(offline, PROMPT, tokens, temperature=0)
    assert kept_tokens(expected) == tokens, "the test needs a greedy text with no EOS"
    return str(expected.text)


def test_a_running_job_shows_its_partial_output_then_its_result(
    slow_vllm: VllmWorker, offline: Any
) -> None:
    client = slow_vllm.client
    expected = greedy(offline, 160)
    # When a long greedy job runs, and we poll its row
    job = client.submit(PROMPT, max_new_tokens=160, temperature=0)
    # Then successive polls while it ran showed more and more tokens, each a prefix of the
    # end, and the row ends with the whole result, as vLLM's own generate gives it
    check_progress_then_result(client, job.id, expected, 160)


def test_a_streamed_jobs_deltas_join_into_its_final_text(
    slow_vllm: VllmWorker, offline: Any
) -> None:
    client = slow_vllm.client
    expected = greedy(offline, 120)
    # When the Python client follows a streamed job as it generates
    job = client.submit(PROMPT, max_new_tokens=120, temperature=0, stream=True)
    parts, statuses = [], []
    for text in client.stream(job.id, idle_timeout=120):
        parts.append(text)
        statuses.append(client.get(job.id).status)
    # Then its deltas came while it ran, and join into the final text
    final = client.get(job.id)
    assert final.status is JobStatus.SUCCEEDED
    assert "".join(parts) == final.text == expected
    assert len(parts) > 2 and statuses[0] is JobStatus.RUNNING


def test_cancelling_a_running_job_stops_its_row_and_its_batch_mates_finish(
    slow_vllm: VllmWorker, offline: Any
) -> None:
    client = slow_vllm.client
    expected = greedy(offline, 200)
    # Given four long greedy jobs running in one engine call
    jobs = client.submit_many([{"prompt": PROMPT, "max_new_tokens": 200, "temperature": 0}] * 4)
    target, mates = jobs[0], jobs[1:]
    running = until(lambda: (row := client.get(target.id)).completion_tokens and row, 120)
    # When the target is cancelled in the middle of its generation
    client.cancel(target.id)
    cancelled_at = time.monotonic()

    # Then its row ends cancelled, holding the tokens kept, within seconds of the cancel
    def recorded() -> Job | None:
        row = client.get(target.id)
        return row if row.choices and row.choices[0].finish_reason == "cancelled" else None

    kept = until(recorded, 60)
    stopped_within_s = time.monotonic() - cancelled_at
    assert kept.status is JobStatus.CANCELLED
    assert 0 < (kept.completion_tokens or 0) < 200
    assert kept.text == expected[: len(kept.text)]
    assert stopped_within_s < 5, f"the row was written {stopped_within_s:.1f}s after the cancel"
    assert (kept.completion_tokens or 0) - (running.completion_tokens or 0) < 60
    # And its batch-mates finish untouched, in their first attempt
    done = client.wait([m.id for m in mates], timeout=120)
    for mate in done:
        assert mate.status is JobStatus.SUCCEEDED and mate.attempts == 1
        assert mate.text == expected and mate.completion_tokens == 200
    # And the cancelled row's token count grew no more while they ran
    after = client.get(target.id)
    assert after.completion_tokens == kept.completion_tokens and after.text == kept.text


def test_a_job_over_its_time_limit_fails_and_its_batch_mate_succeeds(
    slow_vllm: VllmWorker,
) -> None:
    client = slow_vllm.client
    # Given a job whose every step stalls (it cannot end within the limit) and a short one
    slow, quick = client.submit_many(
        [
            {"prompt": f"{STALL} story", "max_new_tokens": 200, "n": 2, "temperature": 0},
            {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0},
        ]
    )
    slow, quick = client.wait([slow, quick], timeout=SLOW_JOB_TIMEOUT_S + 120)
    # Then the long one fails with a timeout naming the setting, once the limit has passed
    assert slow.status is JobStatus.FAILED and slow.choices == []
    assert slow.error is not None and slow.error["type"] == "GenerationTimeout"
    assert f"{SLOW_JOB_TIMEOUT_S:g}s (CQ_JOB_TIMEOUT_S)" in slow.error["message"]
    assert slow.started_at is not None and slow.finished_at is not None
    ran_s = (slow.finished_at - slow.started_at).total_seconds()
    assert SLOW_JOB_TIMEOUT_S <= ran_s < SLOW_JOB_TIMEOUT_S + 10
    # And the short one succeeds, and the worker goes on serving
    assert quick.status is JobStatus.SUCCEEDED and quick.completion_tokens
    after = client.wait(client.submit("after", max_new_tokens=4), timeout=60)
    assert after.status is JobStatus.SUCCEEDED


def test_a_killed_model_process_runs_its_jobs_again_on_the_replacement(
    slow_vllm: VllmWorker, offline: Any
) -> None:
    client, worker = slow_vllm.client, slow_vllm.worker
    expected = greedy(offline, 120)
    # Given four long jobs generating in the worker's model process (the vLLM engine's)
    jobs = client.submit_many([{"prompt": PROMPT, "max_new_tokens": 120, "temperature": 0}] * 4)
    until(lambda: client.get(jobs[0].id).completion_tokens, 120)
    victim = worker.pool_pids()[0]
    # When that process is killed in the middle of them
    os.kill(victim, signal.SIGKILL)
    # Then every job runs again on the replacement, which loads vLLM anew, and finishes once
    done = client.wait(jobs, timeout=400)
    for job in done:
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.attempts == 2 and job.text == expected and job.completion_tokens == 120
    assert worker.alive() and victim not in worker.pool_pids()
    assert worker.log_text().count("exited with 'signal 9 (SIGKILL)'") == 1

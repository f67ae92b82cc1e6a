"""Jobs join a vLLM worker's running ones at the next engine step, and are acked on commit.

On the vLLM engine a flush does not wait for the one running: its jobs join the
engine's running rows, so a short job submitted behind long ones finishes first.
Its message is acknowledged once its own row is committed, while the long jobs'
messages stay in kombu's ``unacked`` hash until theirs are. A warm shutdown lets
the running jobs finish and commit; the messages not started go back to the queue.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from completion_queue import (
    EmbeddedRedis,
    Settings,
    create_app,
    engine_rows,
    prefetch_count,
    queue_depth,
    queue_name,
    send_jobs,
)
from db import JobStatus
from tests.conftest import until
from tests.vllm.conftest import STEP_S, VllmWorker, start_vllm_worker

pytestmark = pytest.mark.timeout(600)

PROMPT = "The queue takes a job"


def broker(worker: VllmWorker) -> redis.Redis[Any]:
    """A client on the worker's Redis db, where kombu keeps its queues and ``unacked``."""
    return redis.Redis.from_url(worker.client.settings.broker_url)


def test_a_job_submitted_behind_long_ones_joins_them_and_is_acked_first(
    slow_vllm: VllmWorker,
) -> None:
    client, redis_client = slow_vllm.client, broker(slow_vllm)
    # Given four long jobs generating (200 steps of STEP_S or more: 4 s at least)
    long = client.submit_many([{"prompt": PROMPT, "max_new_tokens": 200, "temperature": 0}] * 4)
    until(lambda: client.get(long[0].id).completion_tokens, 120)
    assert int(redis_client.hlen("unacked")) == 4
    # When a short job is submitted while they run
    short = client.submit("A short one", max_new_tokens=8, temperature=0)
    done = client.wait(short.id, timeout=60)
    # Then it finished while the long ones still ran: it did not wait for their flush
    assert done.status is JobStatus.SUCCEEDED and done.completion_tokens == 8
    rows = [client.get(job.id) for job in long]
    assert all(row.status is JobStatus.RUNNING for row in rows), [r.status for r in rows]
    # and its message was acked on its commit, while the long jobs' stay held until theirs
    until(lambda: int(redis_client.hlen("unacked")) == 4, 10)
    assert all(client.get(job.id).status is JobStatus.RUNNING for job in long)
    finished = client.wait([job.id for job in long], timeout=120)
    assert all(job.status is JobStatus.SUCCEEDED for job in finished)
    assert all(job.completion_tokens == 200 and job.attempts == 1 for job in finished)
    assert all(done.finished_at < job.finished_at for job in finished)  # type: ignore[operator]
    until(lambda: int(redis_client.hlen("unacked")) == 0, 30)


def test_a_second_message_for_a_running_job_waits_for_it_and_is_acked_with_it(
    slow_vllm: VllmWorker,
) -> None:
    client, redis_client = slow_vllm.client, broker(slow_vllm)
    app = create_app(client.settings)
    try:
        # Given a long job generating on the worker
        job = client.submit(PROMPT, max_new_tokens=200, temperature=0)
        until(lambda: client.get(job.id).completion_tokens, 120)
        # When its message is delivered to the worker a second time while it runs
        send_jobs(app, [client.get(job.id)])
        until(lambda: int(redis_client.hlen("unacked")) == 2, 30)
        # Then the second waits for the run in flight: the job is not claimed again
        assert client.get(job.id).attempts == 1
        done = client.wait(job.id, timeout=120)
        assert done.status is JobStatus.SUCCEEDED and done.attempts == 1
        assert done.completion_tokens == 200
        # and both messages are acked with its commit
        until(lambda: int(redis_client.hlen("unacked")) == 0, 30)
        assert queue_depth(redis_client, queue_name(client.settings.model)) == 0
    finally:
        app.close()


def test_sigterm_commits_the_running_jobs_and_gives_back_the_rest(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    # Given a slowed vLLM worker at the default batch settings: its engine runs 544 rows
    # (two flushes of 8 groups of 32 and a group of interactive calls) and it buffers a
    # flush more (800 messages held)
    defaults = Settings()
    rows = engine_rows(defaults)
    started = start_vllm_worker(
        request,
        redis_server.port,
        9,
        tiny_model,
        tmp_path,
        faults={"step_s": STEP_S},
        batch_size=defaults.batch_size,
        batch_lookahead=defaults.batch_lookahead,
        batch_wait_ms=defaults.batch_wait_ms,
    )
    client, redis_client = started.client, broker(started)
    count = prefetch_count(started.client.settings) + 200
    try:
        # and more long jobs queued for it than it holds, some of them running
        jobs = client.submit_many(
            [{"prompt": PROMPT, "max_new_tokens": 150, "temperature": 0}] * count
        )
        until(lambda: any(client.get(j.id).completion_tokens for j in jobs[:rows]), 120)
        # When it gets SIGTERM (warm shutdown)
        stopping = time.monotonic()
        assert started.worker.stop(timeout_s=120) is not None
        stop_s = time.monotonic() - stopping
        # Then each job was either committed before it stopped or never started: none half-run
        after = [client.get(j.id) for j in jobs]
        statuses = [j.status for j in after]
        assert set(statuses) <= {JobStatus.SUCCEEDED, JobStatus.QUEUED}, set(statuses)
        committed = [j for j in after if j.status is JobStatus.SUCCEEDED]
        assert 1 <= len(committed) <= rows
        # and nothing stays unacked: the committed jobs' messages were acked before the
        # connection closed, the rest (the flush buffered in the main process among them)
        # went back to the queue
        assert int(redis_client.hlen("unacked")) == 0
        queued = queue_depth(redis_client, queue_name(client.settings.model))
        assert queued == count - len(committed)
        # And a new worker runs the rest, once each; the committed rows do not change
        second = tmp_path / "second"
        second.mkdir()
        replacement = start_vllm_worker(
            request,
            redis_server.port,
            9,
            tiny_model,
            second,
            database_url=client.settings.database_url,
            batch_size=defaults.batch_size,
        )
        try:
            done = client.wait([j.id for j in jobs], timeout=300)
        finally:
            replacement.client.close()
            replacement.worker.stop()
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * count
        assert all(j.attempts == 1 and j.completion_tokens == 150 for j in done)
        by_id = {j.id: j for j in done}
        assert all(by_id[j.id] == j for j in committed)
        assert stop_s < 60
    finally:
        client.close()
        started.worker.stop()


def test_a_lone_job_and_a_call_behind_batch_lines_go_to_the_engine_before_the_timer(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    # Given a slowed vLLM worker whose batch buffer flushes every 20 s (CQ_BATCH_WAIT_MS), idle
    wait_s = 20.0
    started = start_vllm_worker(
        request,
        redis_server.port,
        11,
        tiny_model,
        tmp_path,
        faults={"step_s": STEP_S},
        batch_wait_ms=int(wait_s * 1000),
    )
    client = started.client
    try:
        # When one job comes, then another once the first is done
        for prompt in ("A lone job", "Another one"):
            done = client.wait(client.submit(prompt, max_new_tokens=4).id, timeout=60)
            # Then each went to the engine at once, not at the buffer timer's tick
            assert done.status is JobStatus.SUCCEEDED
            assert done.latency_s is not None and done.latency_s < 2.0, done.latency_s
        # And when an interactive call comes while batch lines run (300 steps: 6 s or more)
        lines = client.submit_many(
            [{"prompt": PROMPT, "max_new_tokens": 300, "temperature": 0}] * 4, lane="batch"
        )
        until(lambda: any(client.get(j.id).completion_tokens for j in lines), 60)
        call = client.wait(client.submit("A call", max_new_tokens=4).id, timeout=60)
        running = [client.get(j.id).status for j in lines]
        # Then it went ahead of them at once, and finished while they still ran
        assert call.status is JobStatus.SUCCEEDED
        assert call.latency_s is not None and call.latency_s < 2.0, call.latency_s
        assert JobStatus.RUNNING in running, running
        done_lines = client.wait([j.id for j in lines], timeout=120)
        assert [j.status for j in done_lines] == [JobStatus.SUCCEEDED] * 4
    finally:
        client.close()
        started.worker.stop()

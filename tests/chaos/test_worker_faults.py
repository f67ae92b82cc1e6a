"""Faults done for real on worker processes: no job lost, none doubled."""

from __future__ import annotations

import os
import signal
import time

from completion_queue import Settings, create_app, queue_name, send_jobs
from db import JobStatus
from tests.chaos.conftest import Chaos, kill_worker, node_name, wait_for


def long_jobs(count: int, tokens: int = 400) -> list[dict[str, object]]:
    return [
        {"prompt": f"story {i}", "max_new_tokens": tokens, "temperature": 0} for i in range(count)
    ]


def test_sigkill_of_the_model_process_mid_batch_loses_no_job(chaos: Chaos) -> None:
    # Given a worker whose model process takes 6 s to start (Celery's own limit is 4 s)
    worker = chaos.start_worker(faults={"load_s": 6})
    with chaos.client() as client:
        # and a batch of long jobs running in that process
        jobs = client.submit_many(long_jobs(8))
        wait_for(lambda: client.list(status="running"), 60, "the batch to start")
        victim = worker.pool_pids()[0]
        # When that process is killed mid-batch
        os.kill(victim, signal.SIGKILL)
        # Then every job is redelivered and completes once, on the restarted process
        done = client.wait(jobs, timeout=240)
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 8
    assert all(j.attempts == 2 for j in done)
    assert all(j.completion_tokens and j.completion_tokens > 0 for j in done)
    assert worker.alive() and victim not in worker.pool_pids()
    # and the one replacement was let load: none was killed waiting for it to come up
    log = worker.log_text()
    assert "Timed out waiting for UP message" not in log
    assert log.count("exited with 'signal 9 (SIGKILL)'") == 1


def test_sigkill_of_the_whole_worker_runs_its_jobs_again_within_a_minute(chaos: Chaos) -> None:
    # Given a worker at the default settings running a batch, with more jobs prefetched
    worker = chaos.start_worker()
    with chaos.client() as client:
        jobs = client.submit_many(long_jobs(24))
        wait_for(lambda: client.list(status="running"), 60, "the batch to start")
        # When the whole worker (main and model process) dies mid-batch, and is restarted
        kill_worker(worker)
        killed = time.monotonic()
        assert chaos.unacked_messages() > 0
        chaos.start_worker()
        # Then every job it held runs again and succeeds once, within a minute of the kill
        done = client.wait(jobs, timeout=240)
        recovery_s = time.monotonic() - killed
    print(f"\nrecovery: {recovery_s:.1f}s from SIGKILL to the last job succeeded")
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 24
    assert all(j.attempts in (1, 2) for j in done) and any(j.attempts == 2 for j in done)
    assert recovery_s < 60
    wait_for(lambda: chaos.unacked_messages() == 0, 30, "every message to be acked")


def test_a_worker_killed_holding_the_restore_mutex_holds_no_one_back(chaos: Chaos) -> None:
    # Given a worker at the default settings running a batch (slowed, so that it is still
    # running when the sweeper below is up)
    worker = chaos.start_worker(faults={"slow": "story", "slow_s": 120})
    with chaos.client() as client:
        jobs = client.submit_many(long_jobs(8))
        wait_for(lambda: client.list(status="running"), 60, "the batch to start")
        # and a second worker stalled in its restore sweep, holding kombu's unacked_mutex
        sweeper = chaos.start_worker(faults={"hold_restore_mutex": True}, ready=False)
        wait_for(lambda: "holding unacked_mutex" in sweeper.log_text(), 60, "the sweep")
        assert chaos.redis.exists("unacked_mutex")
        # When both die at once (SIGKILL), and a fresh worker starts
        kill_worker(worker)
        kill_worker(sweeper)
        killed = time.monotonic()
        chaos.start_worker()
        # Then the first worker's jobs still run again within a minute
        done = client.wait(jobs, timeout=240)
        recovery_s = time.monotonic() - killed
    print(f"\nrecovery past a held mutex: {recovery_s:.1f}s")
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 8
    assert all(j.attempts == 2 for j in done)
    assert recovery_s < 60


def test_a_live_worker_s_long_batch_is_never_redelivered(chaos: Chaos) -> None:
    # Given a worker at the default settings whose batch generates for longer than
    # the visibility timeout (a long generation on a big model), and a second worker
    slow = Settings().visibility_timeout_s + 15
    chaos.start_worker(faults={"slow": "slowly", "slow_s": slow})
    with chaos.client() as client:
        jobs = client.submit_many(
            [{"prompt": f"slowly {i}", "max_new_tokens": 4, "temperature": 0} for i in range(8)]
        )
        wait_for(lambda: client.list(status="running"), 60, "the batch to start")
        chaos.start_worker()
        # When the batch outlasts the visibility timeout
        done = client.wait(jobs, timeout=slow + 120)
    # Then its messages stayed its own: every job ran once, on the first worker
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 8
    assert [j.attempts for j in done] == [1] * 8
    assert len({j.worker for j in done}) == 1
    wait_for(lambda: chaos.unacked_messages() == 0, 30, "every message to be acked")


def test_sigterm_mid_batch_finishes_the_batch_and_returns_the_rest(chaos: Chaos) -> None:
    worker = chaos.start_worker()
    with chaos.client() as client:
        # Given one batch running and a second one waiting in the worker's buffer
        jobs = client.submit_many(long_jobs(16, tokens=200))
        wait_for(lambda: client.list(status="running"), 60, "the first batch to start")
        # When the worker gets SIGTERM (warm shutdown)
        assert worker.stop(timeout_s=120) is not None
        # Then the running batch was finished and committed, and nothing else ran
        after_stop = [client.get(j.id) for j in jobs]
        finished = [j for j in after_stop if j.status is JobStatus.SUCCEEDED]
        assert len(finished) >= 8
        assert all(j.status in (JobStatus.SUCCEEDED, JobStatus.QUEUED) for j in after_stop)
        # and the messages of the rest are back in the queue: a new worker runs them
        chaos.start_worker()
        done = client.wait(jobs, timeout=240)
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 16
    assert all(j.attempts == 1 for j in done)
    by_id = {j.id: j for j in done}
    assert all(by_id[j.id] == j for j in finished)


def test_a_duplicate_of_a_finished_job_changes_nothing(chaos: Chaos) -> None:
    chaos.start_worker()
    app = create_app(chaos.settings)
    with chaos.client() as client:
        # Given a finished job
        job = client.wait(client.submit("Once upon a time", max_new_tokens=8), timeout=60)
        assert job.status is JobStatus.SUCCEEDED
        # When its message is delivered again, and a later job has run after it
        send_jobs(app, [job, job])
        sentinel = client.wait(client.submit("after", max_new_tokens=2), timeout=60)
        assert sentinel.status is JobStatus.SUCCEEDED
        wait_for(lambda: chaos.queued_messages() + chaos.unacked_messages() == 0, 30, "drain")
        # Then the job's row is exactly as it was
        assert client.get(job.id) == job
    app.close()


def test_a_duplicate_of_a_running_job_gives_one_result(chaos: Chaos) -> None:
    first, second = chaos.start_worker(), chaos.start_worker()
    app = create_app(chaos.settings)
    queue = queue_name(chaos.settings.model)
    with chaos.client() as client:
        # Given a long job running on one worker, which then stops taking messages
        job = client.submit("story", max_new_tokens=400, n=8, temperature=0)
        wait_for(lambda: client.get(job.id).status is JobStatus.RUNNING, 60, "the job to start")
        running_on = client.get(job.id).worker
        holder, other = (first, second) if running_on == node_name(first) else (second, first)
        assert running_on == node_name(holder)
        assert app.control.cancel_consumer(queue, destination=[node_name(holder)], reply=True)
        # When a duplicate of its message reaches the other worker while it runs
        send_jobs(app, [job])
        wait_for(lambda: client.get(job.id).attempts == 2, 60, "the duplicate to be claimed")
        done = client.wait(job, timeout=240)
        wait_for(lambda: chaos.unacked_messages() == 0, 240, "both deliveries to be acked")
        # Then only the later claim's result is written; the first run's is discarded
        final = client.get(job.id)
    assert final.status is JobStatus.SUCCEEDED and final == done
    assert final.attempts == 2 and final.worker == node_name(other)
    assert len(final.choices) == 8
    app.close()


def test_cancelling_a_running_job_stops_its_row_and_leaves_its_batch_mates_alone(
    chaos: Chaos,
) -> None:
    # Given a batch of eight long jobs running on a model whose steps take 30 ms
    # (300 tokens take 9 s or more: the cancel lands mid-batch however fast the machine)
    chaos.start_worker(faults={"crawl_s": 0.03})
    with chaos.client() as client:
        jobs = client.submit_many(long_jobs(8, tokens=300))
        target, mates = jobs[3], jobs[:3] + jobs[4:]
        wait_for(lambda: client.get(target.id).completion_tokens, 60, "the batch's first progress")
        # When one of them is cancelled mid-batch
        cancelled = client.cancel(target.id)

        # Then the worker stops its row: the row holds the tokens kept, ending "cancelled",
        # while its batch-mates still run
        def stopped() -> bool:
            row = client.get(target.id)
            return bool(row.choices) and row.choices[0].finish_reason == "cancelled"

        wait_for(stopped, 30, "the worker to stop the cancelled row")
        kept = client.get(target.id)
        assert any(client.get(m.id).status is JobStatus.RUNNING for m in mates)
        # and its token count grows no more while they finish
        done = client.wait(jobs, timeout=240)
    assert cancelled.status is JobStatus.CANCELLED
    assert done[3].status is JobStatus.CANCELLED and done[3].attempts == 1
    (choice,) = done[3].choices
    assert choice.finish_reason == "cancelled"
    assert 0 < choice.completion_tokens == kept.completion_tokens < 300
    assert done[3].text == kept.text
    others = done[:3] + done[4:]
    assert [j.status for j in others] == [JobStatus.SUCCEEDED] * 7
    assert all(j.attempts == 1 and j.choices for j in others)
    assert all(j.completion_tokens == 300 or j.choices[0].finish_reason == "stop" for j in others)

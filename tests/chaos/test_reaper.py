"""The reaper: jobs whose messages are gone come back once; unserved jobs expire."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from completion_queue import Settings, create_app, queue_name, waiting, worker_env
from db import JobRow, JobStatus, Outcome, claim_jobs, finish_jobs, utcnow
from tests.chaos.conftest import Chaos, wait_for


def cq_reap(chaos: Chaos, **overrides: object) -> str:
    env = {**os.environ, **worker_env(chaos.settings.model_copy(update=overrides))}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "reap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def claimed_long_ago(session: Session, job_id: uuid.UUID, *, times: int = 1) -> None:
    """Claim a job ``times`` as a worker that died would have, past CQ_REAP_RUNNING_AFTER_S."""
    for _ in range(times):
        claim_jobs(session, job_ids=[job_id], worker="lost-worker")
    long_ago = utcnow() - timedelta(seconds=Settings().reap_running_after_s + 60)
    session.execute(update(JobRow).where(JobRow.id == job_id).values(started_at=long_ago))


def test_cq_reap_requeues_a_stuck_job_once_and_fences_its_old_attempt(chaos: Chaos) -> None:
    with chaos.client() as client:
        # Given a job claimed by a worker that died, and whose message Redis lost
        job = client.submit("Once upon a time", max_new_tokens=4)
        chaos.redis.flushdb()
        with client.sessions.begin() as session:
            claimed_long_ago(session, job.id)
        # When the reaper runs twice, at the default settings
        first = cq_reap(chaos)
        second = cq_reap(chaos)
        # Then the job is queued again with exactly one new message
        assert "requeued 1 stuck job(s)" in first and "requeued 0 stuck job(s)" in second
        assert client.get(job.id).status is JobStatus.QUEUED
        assert chaos.queued_messages() == 1
        # and a late result of the lost attempt changes nothing
        late = Outcome(job_id=job.id, attempt=1, status=JobStatus.SUCCEEDED)
        with client.sessions.begin() as session:
            assert finish_jobs(session, outcomes=[late]).changed == 0
        assert client.get(job.id).status is JobStatus.QUEUED


def test_cq_reap_fails_a_job_claimed_too_often(chaos: Chaos) -> None:
    with chaos.client() as client:
        job = client.submit("Once upon a time", max_new_tokens=4)
        with client.sessions.begin() as session:
            claimed_long_ago(session, job.id, times=2)
        assert "failed 1" in cq_reap(chaos, max_attempts=2)
        failed = client.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error["type"] == "AttemptsExceeded"


def test_workers_reap_lost_jobs_and_expire_unserved_ones(chaos: Chaos) -> None:
    # Given a worker that reaps every half second
    worker = chaos.start_worker(
        reap_interval_s=0.5,
        reap_running_after_s=3,
        visibility_timeout_s=2,
        job_timeout_s=1,
        queue_timeout_s=3,
    )
    queue = queue_name(chaos.settings.model)
    control = create_app(chaos.settings).control
    node = [worker.nodename]  # a reply from each named node ends the wait (else: all 5 s)
    with chaos.client() as client:
        # and a job marked running by a worker that died, whose message is gone
        assert control.cancel_consumer(queue, reply=True, timeout=5, destination=node)
        lost = client.submit("Once upon a time", max_new_tokens=4)
        # (released by the worker's dispatcher to the model's queue, which it no longer
        # consumes: deleted before that, it could be released and taken meanwhile)
        wait_for(lambda: waiting(chaos.redis, queue)[""] == 1, 10, "the message")
        for key in chaos.redis.keys(f"{queue}*"):
            chaos.redis.delete(key)
        with client.sessions.begin() as session:
            claim_jobs(session, job_ids=[lost.id], worker="lost-worker")
        assert control.add_consumer(queue, reply=True, timeout=5, destination=node)
        # and a job for a model no worker serves
        unserved = client.submit("Hello", model="no-such-model", max_new_tokens=4)
        # When the reaper's deadlines pass
        lost, unserved = client.wait([lost, unserved], timeout=60)
    # Then the lost job runs again, once, and the unserved one expires with a clear error
    assert lost.status is JobStatus.SUCCEEDED and lost.attempts == 2
    assert lost.worker != "lost-worker"
    assert unserved.status is JobStatus.FAILED and unserved.error is not None
    assert unserved.error["type"] == "QueueTimeout"
    assert "CQ_QUEUE_TIMEOUT_S" in unserved.error["message"]
    assert "reaper: requeued 1 stuck job(s)" in worker.log_text()
    control.app.close()

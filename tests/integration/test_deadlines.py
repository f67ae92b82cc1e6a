"""Deadlines and lanes through a real worker, Redis and database: a job not started by its
deadline fails without running; each submit path stores its lane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from completion_queue import reap, send_jobs, worker_env
from db import JobRow, JobStatus, NewJob, create_jobs, utcnow
from producer import CompletionClient
from tests.conftest import Stack

#: A model no worker serves: its jobs stay queued for the reaper.
NO_WORKER = "deadline-test-no-worker"


def test_a_job_past_its_deadline_fails_without_running(
    client: CompletionClient, stack: Stack
) -> None:
    # Given a job whose deadline passed while it waited (its row written directly: a submit
    # refuses a deadline in the past), and a job whose deadline is a minute away
    late = NewJob(
        model=stack.settings.model,
        prompt="Once upon a time",
        params={"max_new_tokens": 4, "temperature": 0.0},
        deadline=utcnow() - timedelta(seconds=1),
    )
    with client.sessions.begin() as session:
        [(late_job, _)] = create_jobs(session, jobs=[late])
    in_time = client.submit("Once upon a time", max_new_tokens=4, deadline=60)
    assert in_time.deadline is not None and in_time.lane == "interactive"
    # When its message reaches the worker, beside the other's
    send_jobs(client.app, [late_job])
    done = client.wait([late_job.id, in_time.id], timeout=60)
    # Then it failed with deadline_exceeded, never claimed: no attempt, no start, no worker,
    # no tokens; the other ran
    failed, ran = done
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error["type"] == "DeadlineExceeded"
    assert "deadline" in failed.error["message"]
    assert (failed.attempts, failed.started_at, failed.worker) == (0, None, None)
    assert failed.completion_tokens is None and failed.choices == []
    assert ran.status is JobStatus.SUCCEEDED and ran.attempts == 1
    assert ran.started_at is not None and ran.deadline is not None
    assert ran.started_at <= ran.deadline


def test_the_reaper_fails_a_job_past_its_deadline_that_no_worker_serves(
    client: CompletionClient, stack: Stack
) -> None:
    # Given a queued job for a model no worker serves, with a deadline a minute away
    job = client.submit("x", model=NO_WORKER, deadline=60)
    fresh = reap(stack.settings, client.app, client.sessions)
    assert client.get(job.id).status is JobStatus.QUEUED
    # When its deadline passes (set back by hand rather than waited for) and the reaper runs
    with client.sessions.begin() as session:
        session.execute(
            update(JobRow)
            .where(JobRow.id == job.id)
            .values(deadline=utcnow() - timedelta(seconds=1))
        )
    report = reap(stack.settings, client.app, client.sessions)
    # Then it failed with DeadlineExceeded without running (the worker's own reaper, every
    # CQ_REAP_INTERVAL_S, may have taken it first)
    expired = client.get(job.id)
    assert fresh.past_deadline == 0 and report.past_deadline in (0, 1)
    assert expired.status is JobStatus.FAILED and expired.attempts == 0
    assert expired.error is not None and expired.error["type"] == "DeadlineExceeded"


def test_each_submit_path_of_the_client_and_cli_stores_its_lane(
    client: CompletionClient, stack: Stack, tmp_path: Path
) -> None:
    model = {"model": NO_WORKER}
    # The client: interactive unless told otherwise; a request's own lane wins
    assert client.submit("a", **model).lane == "interactive"
    assert client.submit("b", lane="batch", **model).lane == "batch"
    requests = [{"prompt": "c", **model}, {"prompt": "d", "lane": "interactive", **model}]
    many = client.submit_many(requests, lane="batch")
    assert [client.get(job.id).lane for job in many] == ["batch", "interactive"]
    # The CLI: one prompt is interactive, --file lines are batch, --deadline is stored
    env = {**os.environ, **worker_env(stack.settings)}

    def cq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    one = cq("submit", "e", "--model", NO_WORKER, "--deadline", "120")
    assert one.returncode == 0, one.stderr
    shown = json.loads(one.stdout)
    assert shown["lane"] == "interactive" and shown["deadline"] is not None
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(json.dumps({"prompt": p, **model}) + "\n" for p in "fg"))
    filed = cq("submit", "--file", str(lines), "--deadline", "2099-01-01T00:00:00Z")
    assert filed.returncode == 2 and "deadline must be at most 30 days" in filed.stderr
    filed = cq("submit", "--file", str(lines))
    assert filed.returncode == 0, filed.stderr
    batch_id = filed.stdout.split("batch id: ")[1].strip()
    assert {job.lane for job in client.list(batch_id=batch_id)} == {"batch"}
    refused = cq("submit", "h", "--deadline", "soon")
    assert refused.returncode == 2 and "deadline must be an ISO-8601 time" in refused.stderr

"""Soak: 5,000 jobs on two workers while one of them is SIGKILLed and restarted every few seconds."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from completion_queue import JobTimeout, WorkerProcess
from db import JobRow, JobStatus, make_engine, make_session_factory
from tests.chaos.conftest import Chaos, kill_worker

JOBS = 5_000
#: Seconds the victim serves between its restart and the next kill.
SERVE_S = 1.0
#: Longest the first kill then waits for the victim to be running jobs.
RUNNING_WAIT_S = 10.0


def running_on(sessions: sessionmaker[Session], worker: WorkerProcess) -> bool:
    """Whether ``worker`` runs a job now (claimed, not finished)."""
    query = select(JobRow.id).where(
        JobRow.status == JobStatus.RUNNING, JobRow.worker == worker.nodename
    )
    with sessions() as session:
        return session.scalar(query.limit(1)) is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_no_job_lost_none_doubled_under_repeated_kills(
    chaos: Chaos, capsys: pytest.CaptureFixture[str]
) -> None:
    # A kill between Redis's BRPOP and kombu's unacked record loses that message; the
    # reaper sends it again once the queue is empty (CQ_REAP_QUEUED_AFTER_S).
    worker_options = {
        "batch_size": 32,
        "batch_lookahead": 2,
    }
    chaos.start_worker(**worker_options)
    victim = chaos.start_worker(**worker_options)
    sessions = make_session_factory(make_engine(chaos.settings.resolved_database_url()))
    started = time.monotonic()
    kills = 0
    with chaos.client() as client:
        # Given 5,000 short jobs
        jobs = []
        for start in range(0, JOBS, 1000):
            jobs += client.submit_many(
                [
                    {"prompt": f"soak job {i}", "max_new_tokens": 24, "temperature": 0}
                    for i in range(start, start + 1000)
                ]
            )
        # When one worker is killed (SIGKILL, main and model process) and restarted
        # every few seconds until every job is finished
        done = None
        while done is None:
            try:
                done = client.wait(jobs, timeout=SERVE_S)
            except JobTimeout:
                # The first kill waits until the victim runs jobs, so one kill at least hits
                # a batch however loaded the machine (its first claim may come later than
                # SERVE_S); the others come when they come, as a lost machine's would (kills
                # always aimed at running jobs would fail them as crash loops).
                deadline = time.monotonic() + RUNNING_WAIT_S
                while not kills and not running_on(sessions, victim):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                kill_worker(victim)
                kills += 1
                victim = chaos.start_worker(**worker_options)
            assert time.monotonic() - started < 300, f"soak not done after {kills} kills"
        elapsed = time.monotonic() - started
        rows = client.list(limit=JOBS * 2)
    # Then every job has exactly one succeeded row with one result, and the counts add up
    statuses = Counter(j.status for j in done)
    lost = JOBS - statuses[JobStatus.SUCCEEDED]
    duplicates = len(rows) - len({j.id for j in rows})
    attempts = Counter(j.attempts for j in done)
    with capsys.disabled():
        print(
            f"\nsoak: jobs={JOBS} kills={kills} duplicates={duplicates} lost={lost} "
            f"attempts={dict(sorted(attempts.items()))} seconds={elapsed:.0f}"
        )
    assert kills >= 3
    assert sum(n for attempt, n in attempts.items() if attempt > 1) > 0, "no kill hit a batch"
    assert len(rows) == JOBS and duplicates == 0
    assert statuses == {JobStatus.SUCCEEDED: JOBS} and lost == 0
    assert all(len(j.choices) == 1 and j.completion_tokens for j in done)

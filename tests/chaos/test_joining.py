"""A worker joining during a backlog, at the default settings: once its model is loaded it
takes its share of the jobs another worker held (issue 34), and every job runs once."""

from __future__ import annotations

from completion_queue import Settings
from db import JobStatus
from tests.chaos.conftest import Chaos, wait_for
from tests.chaos.test_leaving import DEFAULT_BATCHING, queued_rows
from tests.chaos.test_worker_faults import long_jobs


def test_a_worker_started_during_a_backlog_takes_its_share_once_ready(chaos: Chaos) -> None:
    defaults = Settings()
    backlog = defaults.batch_size * defaults.batch_lookahead
    first = chaos.start_worker(**DEFAULT_BATCHING)
    with chaos.client() as client:
        # Given a worker at the default settings holding a whole backlog of long jobs
        jobs = client.submit_many(long_jobs(backlog, tokens=400))
        wait_for(lambda: chaos.unacked_messages() >= backlog, 60, "the worker to hold them all")
        # When a second worker starts, and its model is loaded
        second = chaos.start_worker(**DEFAULT_BATCHING)
        left = queued_rows(chaos)
        done = client.wait(jobs, timeout=600)
    by_second = sum(job.worker == second.nodename for job in done)
    print(
        f"\nthe joining worker ran {by_second} of {len(jobs)} jobs "
        f"({by_second / len(jobs):.0%}); {left} had not started when it was ready"
    )
    # Then every job ran exactly once
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * len(jobs)
    assert [j.attempts for j in done] == [1] * len(jobs)
    assert {j.worker for j in done} == {first.nodename, second.nodename}
    # and the joining worker ran close to half of those not started when it was ready,
    # though the first worker held them all
    assert by_second >= 0.4 * left > 0
    wait_for(lambda: chaos.unacked_messages() == 0, 30, "every message to be acked")

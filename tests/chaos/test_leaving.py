"""Workers leaving during a backlog, at the default settings: what was not started goes back
at once, what was started finishes, and every job runs exactly once."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from completion_queue import Settings, prefetch_count
from db import JobRow, JobStatus, make_engine
from tests.chaos.conftest import Chaos, wait_for
from tests.chaos.test_worker_faults import long_jobs

#: The batching settings the chaos fixture shortens, back at their defaults.
DEFAULT_BATCHING = {
    name: getattr(Settings(), name) for name in ("batch_size", "batch_lookahead", "batch_wait_ms")
}


def queued_rows(chaos: Chaos) -> int:
    """Jobs whose row says queued (never started)."""
    engine = make_engine(chaos.settings.resolved_database_url())
    try:
        with engine.connect() as connection:
            stmt = select(func.count()).where(JobRow.status == JobStatus.QUEUED.value)
            return int(connection.execute(stmt).scalar_one())
    finally:
        engine.dispose()


def test_sigterm_hands_back_unstarted_jobs_within_a_second_and_each_runs_once(
    chaos: Chaos,
) -> None:
    defaults = Settings()
    held = prefetch_count(defaults)
    first = chaos.start_worker(**DEFAULT_BATCHING)
    with chaos.client() as client:
        # Given a worker at the default settings holding all it takes of a backlog of long
        # jobs: a flush running in its model process, the next one buffered
        jobs = client.submit_many(long_jobs(held + 64, tokens=400))
        wait_for(lambda: chaos.unacked_messages() >= held, 60, "the worker to hold its prefetch")
        wait_for(lambda: client.list(status="running"), 60, "the first group to start")
        # When it gets SIGTERM
        stopped_at = time.monotonic()
        first.terminate()

        # Then within a second every job it had not started is back in Redis: its message
        # waits again, and the worker holds only the group it runs
        def handed_back() -> bool:
            return chaos.queued_messages() == queued_rows(chaos)

        wait_for(handed_back, 1.0, "the unstarted jobs' messages to be back")
        back_s = time.monotonic() - stopped_at
        waiting = chaos.queued_messages()
        assert waiting >= held + 64 - 2 * defaults.batch_size
        assert chaos.unacked_messages() <= defaults.batch_size
        # and the worker finishes its running group and exits cleanly
        assert first.stop(timeout_s=120) == 0
        ran_first = {j.id for j in client.list(status="succeeded", limit=1000)}
        assert ran_first
        # When a second worker takes over
        second = chaos.start_worker(**DEFAULT_BATCHING)
        done = client.wait(jobs, timeout=600)
    print(f"\nhanded back {waiting} jobs in {back_s:.2f}s; the first worker ran {len(ran_first)}")
    # Then every job ran exactly once: one attempt, one result
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * len(jobs)
    assert [j.attempts for j in done] == [1] * len(jobs)
    assert all(len(j.choices) == 1 and j.completion_tokens for j in done)
    assert {j.worker for j in done if j.id not in ran_first} == {second.nodename}
    wait_for(lambda: chaos.unacked_messages() == 0, 30, "every message to be acked")

"""Redis stops and starts again (append-only on) while jobs are queued and a batch runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from completion_queue import BrokerUnavailable, EmbeddedRedis
from db import JobStatus
from tests.chaos.conftest import Chaos, wait_for


def test_a_redis_restart_loses_no_job_and_refuses_producers_meanwhile(
    own_redis: Callable[..., EmbeddedRedis], chaos: Chaos
) -> None:
    server = own_redis(appendonly=True)
    chaos.use_broker(server.url)
    chaos.start_worker()
    with chaos.client() as client:
        # Given one batch running and another one's messages held by the worker
        jobs = client.submit_many(
            [{"prompt": f"story {i}", "max_new_tokens": 200, "temperature": 0} for i in range(16)]
        )
        wait_for(lambda: client.list(status="running"), 60, "the first batch to start")
        # When Redis stops
        server.stop()
        # Then a producer gets a clear error, and no row is left behind
        with pytest.raises(BrokerUnavailable, match="could not queue 1 job"):
            client.submit("while Redis is down", max_new_tokens=4)
        assert len(client.list(limit=100)) == 16
        # and when Redis is back, on the same port and data, every job completes once
        server.start()
        done = client.wait(jobs, timeout=240)
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 16
        assert all(len(j.choices) == 1 and j.attempts >= 1 for j in done)
        wait_for(lambda: chaos.queued_messages() + chaos.unacked_messages() == 0, 60, "drain")
        # and the worker serves new jobs
        after = client.wait(client.submit("after", max_new_tokens=4), timeout=60)
        assert after.status is JobStatus.SUCCEEDED

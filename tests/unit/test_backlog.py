"""The backlog signal's pure parts: the workers it asks for, and a worker's measured rate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db import Served
from producer.backlog import desired_workers, worker_rates

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_desired_workers_drain_the_queued_tokens_in_time() -> None:
    def desired(queued: int, running: int, tokens: int) -> int:
        return desired_workers(
            queued_jobs=queued,
            running_jobs=running,
            queued_tokens=tokens,
            tokens_per_s=100.0,
            drain_s=300.0,
        )

    # 30,000 tokens per worker in 300 s at 100 tokens/s
    assert desired(0, 0, 0) == 0
    assert desired(1, 0, 10) == 1
    assert desired(0, 3, 0) == 1
    assert desired(500, 0, 30_000) == 1
    assert desired(500, 0, 30_001) == 2
    assert desired(10_000, 8, 3_000_000) == 100


def test_a_worker_rate_is_its_tokens_over_the_time_it_was_busy() -> None:
    since = T0
    served = [
        # worker a: 600 tokens over 20 s of two tenants' jobs (one started before the window)
        Served("m", "t1", "a", 3, 400, T0 - timedelta(seconds=30), T0 + timedelta(seconds=10)),
        Served("m", "t2", "a", 1, 200, T0 + timedelta(seconds=5), T0 + timedelta(seconds=20)),
        # worker b: 300 tokens over 10 s
        Served("m", "t1", "b", 2, 300, T0 + timedelta(seconds=40), T0 + timedelta(seconds=50)),
        # a job cancelled while queued: no worker, not a rate
        Served("m", "t1", None, 1, 0, None, T0 + timedelta(seconds=1)),
        # another model, one instant job: its busy time counts as 1 s
        Served("n", None, "c", 1, 50, T0 + timedelta(seconds=2), T0 + timedelta(seconds=2)),
    ]
    assert worker_rates(served, since=since) == {"m": 900 / 30, "n": 50.0}
    assert worker_rates([], since=since) == {}

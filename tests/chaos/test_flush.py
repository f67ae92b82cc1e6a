"""How a real worker's buffered messages become groups: a burst cut by a flush fills whole groups.

The first batch is held for a few seconds by the ``slow`` fault, so the late
jobs surely arrive while it runs.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from db import JobStatus
from tests.chaos.conftest import Chaos, wait_for


def jobs(prefix: str, count: int) -> list[dict[str, object]]:
    return [
        {"prompt": f"{prefix} {i}", "max_new_tokens": 2, "temperature": 0} for i in range(count)
    ]


@pytest.mark.parametrize(
    "settings",
    [{"batch_lookahead": 4, "batch_wait_ms": 300}, {"batch_lookahead": 8}],
    ids=["long-wait", "default-wait-and-lookahead"],
)
def test_a_flush_keeps_what_is_past_whole_groups_for_the_late_jobs(
    chaos: Chaos, settings: dict[str, int]
) -> None:
    # Given a static-engine worker with groups of 8 and room for 4 (or 8) groups in a flush,
    # whose batches holding "slowly" sleep 3 s; the flush wait a long one, or the default
    chaos.start_worker(faults={"slow": "slowly", "slow_s": 3}, **settings)
    with chaos.client() as client:
        # When 12 jobs come at once (one group and 4 more in the first flush)
        first = client.submit_many(jobs("slowly", 12))
        wait_for(lambda: client.list(status="running"), 60, "the first group to start")
        # And 4 more while the first group runs
        late = client.submit_many(jobs("late", 4))
        done = client.wait(first + late, timeout=120)
    # Then all ran once, as two full groups: the 4 kept back went with the 4 late ones
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 16
    assert [j.attempts for j in done] == [1] * 16
    assert sorted(Counter(j.started_at for j in done).values()) == [8, 8]
    [late_group] = {j.started_at for j in done[12:]}
    assert sum(j.started_at == late_group for j in done[:12]) == 4
    # And no message is left unacknowledged
    wait_for(lambda: chaos.unacked_messages() == 0, 30, "every message to be acked")


def test_an_idle_worker_waits_for_a_burst_still_coming_in(chaos: Chaos) -> None:
    # Given an idle static-engine worker with groups of 8, a 600 ms flush wait, and batches
    # holding "slowly" that sleep 3 s
    chaos.start_worker(faults={"slow": "slowly", "slow_s": 3}, batch_lookahead=4, batch_wait_ms=600)
    with chaos.client() as client:
        # When 16 jobs come one by one, 100 ms apart: the first tick finds about 6 of them
        submitted = []
        for job in jobs("slowly", 16):
            submitted += client.submit_many([job])
            time.sleep(0.1)
        done = client.wait(submitted, timeout=120)
    # Then the worker waited for the burst: two full groups, the first 8 jobs first
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 16
    assert sorted(Counter(j.started_at for j in done).values()) == [8, 8]
    assert len({j.started_at for j in done[:8]}) == 1

"""An interactive call while its tenant's batch lines fill the worker (issue 35's third
target): one worker at the default settings, the tiny model, SQLite, a real redis-server.

Its latency is the job row's, from stored to finished (what the worker and the scheduling
add; the client's polling backoff comes on top in both cases alike); the wall-clock time of
submit and wait is printed beside it.
"""

from __future__ import annotations

import statistics
import time

from completion_queue import Settings
from db import JobStatus
from producer.client import CompletionClient
from tests.conftest import until
from tests.integration.test_fair_share import count, drain

#: Interactive calls timed one after another, on an idle worker and behind the batch.
CALLS = 15

#: Batch lines of 64 new tokens: about 30 s of the worker's time, longer than the calls take.
BATCH_LINES = 3000


def timed_calls(client: CompletionClient) -> tuple[list[float], list[float]]:
    """Run :data:`CALLS` interactive calls one after another; return each one's latency in
    its row (stored to finished) and on the wall clock (submit to wait's return)."""
    rows, walls = [], []
    for i in range(CALLS):
        started = time.perf_counter()
        job = client.wait(client.submit(f"Question {i}: why is the sky", max_new_tokens=16))
        walls.append(time.perf_counter() - started)
        assert job.status is JobStatus.SUCCEEDED, job.error
        rows.append((job.finished_at - job.created_at).total_seconds())  # type: ignore[operator]
    return rows, walls


def test_an_interactive_call_waits_at_most_a_step_behind_its_tenants_batch(
    defaults: Settings,
) -> None:
    with CompletionClient(settings=defaults) as client:
        acme = client.as_tenant("acme")
        # Given the call's latency on an idle worker
        idle, idle_wall = timed_calls(acme)
        # When the same tenant's batch lines fill the worker (its prefetch held, more waiting)
        lines = [{"prompt": f"line {i}", "max_new_tokens": 64} for i in range(BATCH_LINES)]
        acme.submit_many(lines, lane="batch")
        until(lambda: count(defaults, JobStatus.SUCCEEDED) >= 2 * CALLS + 256, timeout_s=60)
        try:
            busy, busy_wall = timed_calls(acme)
            left = count(defaults, JobStatus.QUEUED, "acme")
        finally:
            drain(defaults)
    # Then the call's median latency is at most twice the idle one
    p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    print(
        f"interactive p50: idle {p50:.3f} s (wall {statistics.median(idle_wall):.3f} s), "
        f"behind the batch {busy_p50:.3f} s (wall {statistics.median(busy_wall):.3f} s), "
        f"{busy_p50 / p50:.2f}x; slowest behind the batch {max(busy):.3f} s; "
        f"batch lines still queued after the calls: {left}"
    )
    # while the batch still filled the worker throughout
    assert left >= 1000, left
    assert busy_p50 <= 2 * p50, (idle, busy)

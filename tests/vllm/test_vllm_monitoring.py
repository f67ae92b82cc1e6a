"""A vLLM worker's metrics and task events: what Prometheus and Flower read, for its jobs.

The worker's queue side is the same code on either engine; these tests show it is fed
on this one too: its /metrics page counts the jobs it ran, with their queue wait, time
to first token and latency, and its Celery task events (what Flower shows) say each job
was received, started and succeeded or failed on it.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from db import JobStatus
from producer.client import CompletionClient
from tests.conftest import until

pytestmark = pytest.mark.timeout(600)


def metrics(client: CompletionClient) -> dict[tuple[str, str], float]:
    """The worker's /metrics samples for its model, by sample name and status label."""
    url = f"http://127.0.0.1:{client.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == client.settings.model and "le" not in sample.labels:
                key = (sample.name, sample.labels.get("status", ""))
                found[key] = found.get(key, 0.0) + sample.value
    return found


@contextmanager
def task_events(client: CompletionClient) -> Iterator[list[dict[str, Any]]]:
    """Every Celery event on the broker while the block runs (Flower's feed), collected
    by a receiver that is consuming before the block starts."""
    seen: list[dict[str, Any]] = []
    with client.app.connection_for_read() as connection:
        receiver = client.app.events.Receiver(connection, handlers={"*": seen.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False})
        thread.start()
        try:
            # The worker's heartbeat (every 2 s) shows the receiver's queue is bound.
            until(lambda: any(e["type"] == "worker-heartbeat" for e in seen), 30)
            yield seen
        finally:
            receiver.should_stop = True
            thread.join(30)


def test_the_worker_counts_its_jobs_and_sends_their_task_events(
    vllm_client: CompletionClient,
) -> None:
    before = metrics(vllm_client)
    with task_events(vllm_client) as seen:
        # When six greedy jobs run on the vLLM worker, and one whose prompt is past the
        # model's context
        jobs = vllm_client.submit_many(
            [{"prompt": f"job {i}", "max_new_tokens": 4, "temperature": 0} for i in range(6)]
        )
        too_long = vllm_client.submit("word " * 600, max_new_tokens=4)
        done = vllm_client.wait([*jobs, too_long], timeout=120)
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 6 + [JobStatus.FAILED]

        def final() -> dict[str, str]:
            states = {"task-succeeded", "task-failed"}
            return {e["uuid"]: e["type"] for e in seen if e["type"] in states}

        until(lambda: len(final().keys() & {str(j.id) for j in done}) == 7, 30)
    # Then its task events say each job was received and started on it, and how it ended
    by_job: dict[str, list[dict[str, Any]]] = {}
    for event in seen:
        if "uuid" in event:
            by_job.setdefault(event["uuid"], []).append(event)
    for job in done:
        events = by_job[str(job.id)]
        types = [e["type"] for e in events]
        ended = "task-succeeded" if job.status is JobStatus.SUCCEEDED else "task-failed"
        assert {"task-received", "task-started", ended} <= set(types), types
        assert types.index("task-received") < types.index("task-started") < types.index(ended)
        assert {e["hostname"] for e in events} == {vllm_client.get(job.id).worker}
    failed = next(e for e in by_job[str(too_long.id)] if e["type"] == "task-failed")
    assert "ContextLengthExceeded" in failed["exception"]
    # And its /metrics counted them: each job's status, queue wait, first token (the six
    # that ran) and latency, and the tokens they made
    after = metrics(vllm_client)

    def grew(name: str, status: str = "") -> float:
        return after.get((name, status), 0.0) - before.get((name, status), 0.0)

    assert grew("cq_jobs_total", "succeeded") == 6
    assert grew("cq_jobs_total", "failed") == 1
    assert grew("cq_time_to_first_token_seconds_count") == 6
    assert grew("cq_request_queue_time_seconds_count") >= 6
    assert grew("cq_job_latency_seconds_count") == 7
    assert grew("cq_completion_tokens_total") == sum(j.completion_tokens or 0 for j in done)

"""What a long job's row shows while it runs, checked the same way on every engine."""

from __future__ import annotations

import time

from db import Job, JobStatus
from producer.client import CompletionClient


def check_progress_then_result(
    client: CompletionClient, job_id: str, expected: str, tokens: int, timeout_s: float = 120
) -> None:
    """Poll a running greedy job's row until it ends; fail unless it showed its progress.

    Successive polls while it ran must show more and more tokens (three refreshes or
    more), each text a prefix of ``expected``; the row must end with ``expected``, all
    ``tokens`` of it, ended by the length limit.
    """
    seen: list[Job] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = client.get(job_id)
        if row.status is JobStatus.RUNNING and row.completion_tokens:
            seen.append(row)
        if row.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            break
        time.sleep(0.2)
    counts = sorted({row.completion_tokens or 0 for row in seen})
    assert len(counts) >= 3, f"too few distinct progress refreshes: {counts}"
    for row in seen:
        assert len(row.choices) == 1 and row.choices[0].finish_reason is None
        assert row.choices[0].completion_tokens == row.completion_tokens
        assert expected.startswith(row.choices[0].text)
    assert len(seen[-1].choices[0].text) > len(seen[0].choices[0].text) > 0
    final = client.get(job_id)
    assert final.status is JobStatus.SUCCEEDED
    assert final.text == expected and final.completion_tokens == tokens
    assert final.choices[0].finish_reason == "length"

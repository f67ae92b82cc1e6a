"""Progress while a job runs, and cancels that stop the work: a real worker, its model slowed.

The fault plugin makes every forward pass of the model sleep (``crawl_s``), as a
big model's decoding step takes time, so a job of a few hundred tokens runs for
seconds and the tests can watch it from outside, at the default
``CQ_PROGRESS_INTERVAL_MS`` (500 ms).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from completion_queue import events_key
from db import Job, JobStatus
from tests.chaos.conftest import Chaos, wait_for
from tests.progress import check_progress_then_result

pytestmark = pytest.mark.timeout(240)

PROMPT = "The queue takes a job"
#: Seconds each forward pass sleeps: 200 tokens take 10 s or more.
CRAWL_S = 0.05


def _greedy(reference: Any, prompt: str, max_new_tokens: int) -> str:
    ids = reference.greedy_tokens(reference.encode(prompt), max_new_tokens)
    assert len(ids) == max_new_tokens, "the test needs a prompt whose greedy text has no EOS"
    return str(reference.tokenizer.decode(ids, skip_special_tokens=True))


def test_a_running_job_shows_its_partial_output_then_its_result(
    chaos: Chaos, reference: Any
) -> None:
    # Given a worker whose model takes CRAWL_S per step, at the default progress interval
    chaos.start_worker(faults={"crawl_s": CRAWL_S})
    client = chaos.client()
    expected = _greedy(reference, PROMPT, 160)

    # When a long greedy job runs, and we poll its row
    job = client.submit(PROMPT, max_new_tokens=160, temperature=0)
    # Then successive polls while running showed more and more tokens, each a prefix of the
    # end, and the row ends with the whole result, as a direct generate gives it
    check_progress_then_result(client, job.id, expected, 160)


@pytest.mark.parametrize(
    ("engine", "interval_ms"),
    [("static", 500), ("continuous", 500), ("static", 0)],
    ids=["static", "continuous", "no-partial-output"],
)
def test_cancelling_a_running_job_stops_its_rows_and_keeps_its_tokens(
    chaos: Chaos, reference: Any, engine: str, interval_ms: int
) -> None:
    # Given a slowed worker and a batch of four long jobs
    chaos.start_worker(faults={"crawl_s": CRAWL_S}, engine=engine, progress_interval_ms=interval_ms)
    client = chaos.client()
    expected = _greedy(reference, PROMPT, 200)
    jobs = client.submit_many([{"prompt": PROMPT, "max_new_tokens": 200, "temperature": 0}] * 4)
    target, mates = jobs[0], jobs[1:]

    # When the target is cancelled a few seconds into its generation
    wait_for(lambda: client.get(target.id).status is JobStatus.RUNNING, 60, "the job to run")
    time.sleep(2.0)
    running = client.get(target.id)
    if interval_ms:
        assert running.completion_tokens and 0 < running.completion_tokens < 200
    else:
        assert running.choices == [] and running.completion_tokens is None
    client.cancel(target.id)
    cancelled_at = time.monotonic()

    # Then its row ends cancelled with fewer tokens than asked, within a second of the cancel
    def recorded() -> Job | None:
        row = client.get(target.id)
        return row if row.choices and row.choices[0].finish_reason == "cancelled" else None

    wait_for(recorded, 60, "the cancelled job's tokens")
    stopped_within_s = time.monotonic() - cancelled_at
    row = client.get(target.id)
    assert row.status is JobStatus.CANCELLED
    assert 0 < (row.completion_tokens or 0) < 200
    assert row.text == expected[: len(row.text)]
    # The worker sees the cancel at its next check (every 500 ms) and stops at the next step;
    # the tokens kept are in the row at the check after that, long before the batch ends.
    assert stopped_within_s < 5, f"the row was written {stopped_within_s:.1f}s after the cancel"
    if running.completion_tokens:
        assert (row.completion_tokens or 0) - running.completion_tokens < 40
    # And its batch-mates finish untouched, in their first attempt
    done = client.wait([m.id for m in mates], timeout=120)
    for mate in done:
        assert mate.status is JobStatus.SUCCEEDED and mate.attempts == 1
        assert mate.text == expected and mate.completion_tokens == 200


def test_a_streamed_job_writes_its_deltas_then_its_end_to_its_event_stream(
    chaos: Chaos, reference: Any
) -> None:
    # Given a worker, and a job submitted with stream and a stop string
    chaos.start_worker(faults={"crawl_s": 0.01})
    client = chaos.client()
    full = _greedy(reference, PROMPT, 60)
    stop = full[30:34]

    # When it runs to the end
    job = client.wait(
        client.submit(PROMPT, max_new_tokens=60, temperature=0, stop=[stop], stream=True)
    )

    # Then its Redis stream holds deltas whose text adds up to the result, then the end
    # (written just after the result is committed)
    def entries() -> list[dict[str, str]]:
        return [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in chaos.redis.xrange(events_key(job.id))
        ]

    wait_for(lambda: entries()[-1]["type"] == "end", 10, "the stream's end")
    deltas = [e for e in entries() if e["type"] == "delta"]
    assert len(deltas) > 5
    assert "".join(d["text"] for d in deltas) == job.text == full[: full.index(stop)]
    assert {d["attempt"] for d in deltas} == {"1"} and {d["choice"] for d in deltas} == {"0"}
    assert entries()[-1] == {"type": "end", "attempt": "1", "status": "succeeded"}
    assert 0 < chaos.redis.ttl(events_key(job.id)) <= 3600
    # And a job that did not ask for a stream has none
    plain = client.wait(client.submit(PROMPT, max_new_tokens=8, temperature=0))
    assert chaos.redis.exists(events_key(plain.id)) == 0

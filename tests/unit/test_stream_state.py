"""The reader's state (producer/stream.py): stream entries and rows in, text deltas out."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from completion_queue import JobNotFound, JobTimeout, events_key
from db import Choice, Job, JobStatus
from producer.stream import Delta, Finished, Follower, JobStream
from tests.factories import make_job


def delta(attempt: int, choice: int, text: str) -> dict[str, str]:
    return {
        "type": "delta",
        "attempt": str(attempt),
        "choice": str(choice),
        "text": text,
        "tokens": "1",
    }


def row(job_id: uuid.UUID, status: JobStatus, *texts: str) -> Job:
    reason = "stop" if status.finished else None
    return make_job(id=job_id, status=status, choices=[Choice(t, reason, 1) for t in texts])


def shown(events: list[Any], choice: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta) and e.choice == choice)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deltas_of_one_attempt_are_shown_as_they_come() -> None:
    stream = JobStream(uuid.uuid4())
    # When three deltas of choice 0 and one of choice 1 come in
    out = [
        stream.on_entry(f"1-{i}", d)
        for i, d in enumerate(
            [delta(1, 0, "Once"), delta(1, 1, "Twice"), delta(1, 0, " upon"), delta(1, 0, " a")]
        )
    ]
    # Then each is shown once, for its own choice, and the cursor is the last entry
    assert [(d.choice, d.text) for d in out if d] == [
        (0, "Once"),
        (1, "Twice"),
        (0, " upon"),
        (0, " a"),
    ]
    assert stream.last_id == "1-3"
    assert stream.shown == {0: "Once upon a", 1: "Twice"}


def test_rows_and_deltas_are_the_same_prefix_and_nothing_is_shown_twice() -> None:
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    # Given a partial row read before the deltas (a late reader, or a job without stream)
    first = stream.on_row(row(job_id, JobStatus.RUNNING, "The river"))
    # When deltas covering part of it come, then one going further
    covered = stream.on_entry("1-0", delta(1, 0, "The"))
    further = [
        stream.on_entry("1-1", delta(1, 0, " river")),
        stream.on_entry("1-2", delta(1, 0, " runs")),
    ]
    # Then the row's text was shown once, and only the new " runs" after it
    assert first == [Delta(job_id, 0, "The river")]
    assert covered is None
    assert further == [None, Delta(job_id, 0, " runs")]


def test_a_new_attempt_shows_nothing_until_it_passes_what_was_shown() -> None:
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    stream.on_entry("1-0", delta(1, 0, "Hello wor"))
    # When the job is redelivered: attempt 2 starts over
    again = [stream.on_entry(f"2-{i}", delta(2, 0, t)) for i, t in enumerate(["Hel", "lo", " wor"])]
    passed = stream.on_entry("2-3", delta(2, 0, "ld!"))
    # And the first attempt (its worker not quite dead) still writes
    stale = stream.on_entry("2-4", delta(1, 0, "ld?? no"))
    # Then nothing was shown twice, attempt 2 added "ld!", attempt 1 is not followed any more
    assert again == [None, None, None]
    assert passed == Delta(job_id, 0, "ld!")
    assert stale is None
    assert stream.shown[0] == "Hello world!"


def test_a_diverging_attempt_shows_nothing_more_and_the_final_row_is_finished() -> None:
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    stream.on_entry("1-0", delta(1, 0, "cat"))
    # When attempt 2 sampled another text, and the job ends with it
    assert stream.on_entry("2-0", delta(2, 0, "dog and more")) is None
    final = stream.on_row(row(job_id, JobStatus.SUCCEEDED, "dog and more"))
    # Then no delta rewrites the text shown: the Finished row holds the truth
    assert final == [Finished(final[0].job)]  # type: ignore[union-attr]
    assert final[0].job.choices[0].text == "dog and more"  # type: ignore[union-attr]


def test_the_final_row_completes_what_the_deltas_did_not_cover() -> None:
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    events: list[Any] = [stream.on_entry("1-0", delta(1, 0, "The"))]
    assert stream.on_entry("1-1", {"type": "end", "attempt": "1", "status": "succeeded"}) is None
    assert stream.ended
    # When the final row holds more than the deltas (a stop string held back, the last step)
    events += stream.on_row(row(job_id, JobStatus.SUCCEEDED, "The end.", "Other"))
    # Then every choice's text is complete, then Finished
    assert shown(events) == "The end." and shown(events, 1) == "Other"
    assert isinstance(events[-1], Finished) and stream.finished is events[-1].job


def test_half_a_character_is_held_back_until_the_final_text() -> None:
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    # Given partial text ending in half a character (decoded as U+FFFD)
    partial = stream.on_row(row(job_id, JobStatus.RUNNING, "caf\ufffd"))
    held = stream.on_entry("1-0", delta(1, 0, "caf"))
    # When the character is complete, in the stream and then in the final row
    completed = stream.on_entry("1-1", delta(1, 0, "\u00e9 \U0001f600"))
    final = stream.on_row(row(job_id, JobStatus.SUCCEEDED, "caf\u00e9 \U0001f600!"))
    # Then U+FFFD was never shown, and the text shown is the final text, whole characters
    assert partial == [Delta(job_id, 0, "caf")] and held is None
    assert completed is not None and completed.text.startswith("\u00e9")
    text = "caf" + completed.text + shown(final)
    assert text == "caf\u00e9 \U0001f600!" and text.encode("utf-8").decode("utf-8") == text


def test_a_failed_or_cancelled_row_ends_the_stream_with_what_it_holds() -> None:
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    cancelled = make_job(
        id=job_id, status=JobStatus.CANCELLED, choices=[Choice("partial", "cancelled", 3)]
    )
    events = stream.on_row(cancelled)
    assert events == [Delta(job_id, 0, "partial"), Finished(cancelled)]
    failed_id = uuid.uuid4()
    failed = make_job(id=failed_id, status=JobStatus.FAILED, error={"type": "X", "message": "m"})
    assert JobStream(failed_id).on_row(failed) == [Finished(failed)]


@given(
    final=st.text(min_size=1, max_size=40),
    cuts=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 40), st.booleans()), max_size=30),
)
def test_any_mix_of_prefixes_shows_exactly_the_final_text(
    final: str, cuts: list[tuple[int, int, bool]]
) -> None:
    # Given observations that are each a prefix of the final text: deltas of attempts that
    # start over (attempts only grow), and partial rows, in any order
    job_id = uuid.uuid4()
    stream = JobStream(job_id)
    events: list[Any] = []
    sent: dict[int, int] = {}
    attempt = 1
    for n, (step, cut, from_row) in enumerate(cuts):
        attempt = max(attempt, step)
        end = min(cut, len(final))
        if from_row:
            events += stream.on_row(row(job_id, JobStatus.RUNNING, final[:end]))
            continue
        start = sent.get(attempt, 0)
        if end >= start:
            events.append(stream.on_entry(f"1-{n}", delta(attempt, 0, final[start:end])))
            sent[attempt] = end
    events += stream.on_row(row(job_id, JobStatus.SUCCEEDED, final))
    # Then what is shown, joined, is the final text: nothing twice, nothing missing
    assert shown([e for e in events if e is not None]) == final


def test_the_follower_reads_rows_at_start_every_interval_and_at_an_end() -> None:
    clock = Clock()
    first, second = uuid.uuid4(), uuid.uuid4()
    follower = Follower([first, second], row_interval_s=1.0, clock=clock)
    # At the start every row is due; then none until the interval passes
    assert follower.rows_due() == [first, second]
    follower.on_rows({j: row(j, JobStatus.QUEUED) for j in (first, second)}, [first, second])
    clock.now += 0.5
    assert follower.rows_due() == []
    # An end entry makes that job's row due at once (RESP2's reply shape)
    reply = [[events_key(first), [("5-0", {"type": "end", "attempt": "1", "status": "succeeded"})]]]
    assert follower.on_reply(reply) == []
    assert follower.rows_due() == [first]
    done = row(first, JobStatus.SUCCEEDED, "ok")
    assert follower.on_rows({first: done}, [first]) == [Delta(first, 0, "ok"), Finished(done)]
    # And a finished job is no longer read from the stream nor from the table
    assert follower.cursors() == {events_key(second): "0-0"}
    clock.now += 1.0
    assert follower.rows_due() == [second] and not follower.done


def test_the_follower_takes_resp3_replies_and_bytes() -> None:
    job_id = uuid.uuid4()
    follower = Follower([job_id])
    reply = {
        events_key(job_id).encode(): [
            [b"7-1", {b"type": b"delta", b"attempt": b"1", b"choice": b"0", b"text": "é".encode()}]
        ]
    }
    assert follower.on_reply(reply) == [Delta(job_id, 0, "é")]
    assert follower.cursors() == {events_key(job_id): "7-1"}
    assert follower.on_reply(None) == []


def test_a_missing_row_and_a_silent_job_raise() -> None:
    clock = Clock()
    job_id = uuid.uuid4()
    follower = Follower([job_id], idle_timeout_s=5, clock=clock)
    with pytest.raises(JobNotFound, match=str(job_id)):
        follower.on_rows({}, [job_id])
    # New text keeps the follower going; five seconds of nothing ends it
    clock.now += 4
    follower.on_rows({job_id: row(job_id, JobStatus.RUNNING, "a")}, [job_id])
    clock.now += 4
    follower.check_idle()
    clock.now += 2
    with pytest.raises(JobTimeout, match="no new text within 5s"):
        follower.check_idle()

"""How a vLLM worker's buffer fills its engine's rows (``workers.task.ModelBatches``, pure
logic: messages are plain objects with a job id and a routing key)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from completion_queue import lane_queue
from workers.task import ModelBatches


def message(job_id: str, lane: str = "batch") -> Any:
    return SimpleNamespace(id=job_id, delivery_info={"routing_key": lane_queue("m", "t", lane)})


def joining(held_lines: list[str], engine_rows: int = 4, batch_rows: int = 3) -> ModelBatches:
    """A joining buffer whose model process holds ``held_lines`` (batch lines) already."""
    batches = ModelBatches()
    batches.joins, batches.engine_rows, batches.batch_rows = True, engine_rows, batch_rows
    for job_id in held_lines:
        batches._held[job_id] = [message(job_id)]
        batches._held_batch.add(job_id)
    return batches


def drain(batches: ModelBatches) -> list[Any]:
    """Take every buffered message, as a flush does."""
    return [batches._buffer.get_nowait() for _ in range(batches._buffer.qsize())]


def ids(requests: list[Any]) -> list[str]:
    return [request.id for request in requests]


def test_calls_take_rows_first_and_lines_past_their_rows_wait_in_line() -> None:
    # Given an engine of 4 rows, 3 for batch lines, running 2 batch lines
    batches = joining(["a", "b"])
    # When a flush holds 3 new lines, 2 calls and a second message for line a
    flush = [
        message("c"),
        message("x", "interactive"),
        message("d"),
        message("a"),
        message("y", "interactive"),
        message("e"),
    ]
    calls, lines = batches._fitting(flush)
    # Then the calls take the 2 free rows (the batch lines' one among them), and the second
    # message for a takes none; the new lines wait, first in line and in their order
    assert ids(calls) == ["x", "y"]
    assert ids(lines) == ["a"]
    assert ids(drain(batches)) == ["c", "d", "e"]


def test_a_call_fits_past_batch_lines_that_took_every_row() -> None:
    # Given an engine whose every row runs a batch line
    batches = joining(["a", "b", "c", "d"], engine_rows=4, batch_rows=4)
    # Then a buffered line waits for a row
    batches._buffer.put_back(message("e"))
    assert batches._waits()
    # And a call does not: batch lines leave the margin free
    batches._buffer.put_back(message("x", "interactive"))
    assert not batches._waits()
    calls, lines = batches._fitting(drain(batches))
    assert (ids(calls), ids(lines)) == (["x"], [])
    assert ids(drain(batches)) == ["e"]


def test_lines_stop_at_their_own_rows_while_rows_are_free_for_calls() -> None:
    # Given 4 rows, 3 for batch lines, running 3 batch lines
    batches = joining(["a", "b", "c"])
    # Then a new line waits though a row is free, and a call takes that row
    calls, lines = batches._fitting([message("d"), message("x", "interactive")])
    assert (ids(calls), ids(lines)) == (["x"], [])
    assert ids(drain(batches)) == ["d"]


def test_without_an_engine_limit_every_message_goes() -> None:
    batches = joining(["a"], engine_rows=0, batch_rows=0)
    flush = [message("b"), message("x", "interactive"), message("c")]
    calls, lines = batches._fitting(flush)
    assert (ids(calls), ids(lines)) == (["x"], ["b", "c"])
    assert not batches._waits() and batches._buffer.empty()


def test_two_messages_for_one_new_job_take_one_row() -> None:
    # Given an engine with one row free for batch lines
    batches = joining(["a", "b"])
    # When a flush holds two messages for one new job, and another job
    calls, lines = batches._fitting([message("c"), message("c"), message("d")])
    # Then both messages of c fit in its one row (the second waits for its run), and d waits
    assert (ids(calls), ids(lines)) == ([], ["c", "c"])
    assert ids(drain(batches)) == ["d"]

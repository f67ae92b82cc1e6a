"""The vLLM engine's resident step loop, in this process: calls from several threads share it.

A call made while another runs joins at the next engine step: its first token comes
within a few steps and it returns as soon as its own rows end, long before the running
call does. Each call keeps what is its own: a time limit, a cancel, a row vLLM refuses
end that call alone. Batch lines take at most the engine's ``batch_rows``: an interactive
call finds a row free. Closing the engine wakes every caller still waiting.

The engine here is the real :class:`~engine.vllm.VllmEngine` on the tiny model, each step
slowed by ``STEP_S`` (a big model's decoding step, as the slowed worker's fault plugin
does), so a call of 200 tokens runs for 4 s or more.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from completion_queue import GenerationTimeout, ModelError
from engine.types import GenerationRequest, GenerationResult
from engine.vllm import VllmEngine
from tests.conftest import until
from tests.vllm.conftest import kept_tokens, offline_choice

pytestmark = pytest.mark.timeout(600)

#: Seconds each engine step sleeps before it runs.
STEP_S = 0.02
LONG_PROMPT = "The queue takes a job"
SHORT_PROMPT = "Once upon a time"


class SlowSteps(VllmEngine):
    """The real engine, each step slowed by ``STEP_S``: calls last long enough to join."""

    def _step(self) -> list[Any]:
        time.sleep(STEP_S)
        return super()._step()


class Recorder:
    """Follows one call as the worker's progress watch does: tokens, the first's time, stops.

    ``stop_after``: once row 0 has this many tokens, name it to stop (a cancel).
    """

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.rows: list[list[int]] = []
        self.ended: list[bool] = []
        self.stopped: dict[int, int] = {}
        self.first_at: float | None = None
        #: How many times the engine reported any row's tokens.
        self.reports = 0

    def follow(self, requests: Sequence[GenerationRequest]) -> Recorder:
        """Follow ``requests``' rows (each request's n rows, in order)."""
        count = sum(r.n for r in requests)
        self.rows, self.ended = [[] for _ in range(count)], [False] * count
        return self

    def step(self, last: Sequence[int]) -> list[int]:
        """Take one static-engine step's tokens (not used by this engine)."""
        for row, token in zip(self.rows, last, strict=True):
            row.append(token)
        return self.to_stop()

    def set(self, index: int, tokens: list[int]) -> None:
        """Take row ``index``'s tokens so far."""
        if tokens and self.first_at is None:
            self.first_at = time.monotonic()
        self.reports += 1
        self.rows[index] = tokens

    def finish(self, index: int) -> None:
        """Mark row ``index`` ended."""
        self.ended[index] = True

    def tokens(self, index: int) -> list[int]:
        """Row ``index``'s tokens so far."""
        return list(self.rows[index])

    def tick(self) -> None:
        """Nothing to write between steps."""

    def to_stop(self) -> list[int]:
        """Row 0, once it has ``stop_after`` tokens (once)."""
        if self.stop_after is None or 0 in self.stopped:
            return []
        if len(self.rows[0]) < self.stop_after:
            return []
        self.stopped[0] = len(self.rows[0])
        return [0]

    def cancelled_at(self, index: int) -> int | None:
        """Tokens row ``index`` kept when it was stopped, or None."""
        return self.stopped.get(index)


@pytest.fixture(scope="module")
def engine(vllm_runs: None, tiny_model: Path) -> Iterator[SlowSteps]:
    """One slowed vLLM engine on the tiny model, in this process, at the offline LLM's dtype."""
    built = SlowSteps(str(tiny_model), dtype=os.environ.get("CQ_DTYPE", "float32"), max_rows=8)
    yield built
    built.close()


def request(key: str, prompt: str, tokens: int, engine: VllmEngine, **fields: Any) -> Any:
    """A greedy request of ``tokens`` new tokens on ``prompt``."""
    ids = tuple(engine.encode([prompt])[0])
    return GenerationRequest(
        key=key, prompt_ids=ids, max_new_tokens=tokens, temperature=0.0, **fields
    )


def succeeded(result: GenerationResult | Exception) -> GenerationResult:
    """The result, which must not be an error."""
    assert isinstance(result, GenerationResult), result
    return result


def test_a_call_made_while_another_runs_joins_at_the_next_step(
    engine: SlowSteps, offline: Any
) -> None:
    expected_long = offline_choice(offline, LONG_PROMPT, 200, temperature=0)
    assert kept_tokens(expected_long) == 200, "the test needs a long text with no EOS"
    expected_short = offline_choice(offline, SHORT_PROMPT, 8, temperature=0)
    # Given a call of two 200-token rows generating in one thread (4 s or more)
    long_rows = Recorder()
    with ThreadPoolExecutor(1) as pool:
        long_call: Future[list[GenerationResult | Exception]] = pool.submit(
            engine.generate,
            [request("long", LONG_PROMPT, 200, engine, n=2)],
            watch=long_rows,
        )
        until(lambda: long_rows.rows and len(long_rows.rows[0]) >= 5, 120)
        # When a short call is made from another thread
        short_rows = Recorder()
        submitted = time.monotonic()
        (short,) = engine.generate([request("short", SHORT_PROMPT, 8, engine)], watch=short_rows)
        returned = time.monotonic()
        long_tokens_then = len(long_rows.rows[0])
        long_running_then = not long_call.done()
        (long,) = long_call.result(timeout=300)
    # Then its first token came within a few steps, and it returned while the long call ran
    assert short_rows.first_at is not None
    first_token_s = short_rows.first_at - submitted
    print(
        f"\njoin: first token {first_token_s:.3f}s, returned {returned - submitted:.3f}s "
        f"after the submit, the long call at {long_tokens_then}/200 tokens"
    )
    assert first_token_s < 0.5, f"the short call's first token took {first_token_s:.2f}s"
    assert long_running_then and long_tokens_then < 200 - 40, long_tokens_then
    assert returned - submitted < 2.0
    # And both texts are what each gets alone in vLLM's own generate
    assert succeeded(short).choices[0].text == expected_short.text
    for choice in succeeded(long).choices:
        assert choice.text == expected_long.text and choice.completion_tokens == 200


def test_batch_lines_leave_rows_free_for_an_interactive_call(
    engine: SlowSteps, offline: Any
) -> None:
    expected = offline_choice(offline, LONG_PROMPT, 100, temperature=0)
    expected_short = offline_choice(offline, SHORT_PROMPT, 8, temperature=0)
    assert kept_tokens(expected) == 100, "the test needs a long text with no EOS"
    # Given an engine whose batch lines may take 2 of its 8 rows, and a batch call of 4 rows
    # generating in another thread
    all_rows, engine.batch_rows = engine.batch_rows, 2
    batch_rows = Recorder()
    try:
        with ThreadPoolExecutor(2) as pool:
            batch_call: Future[list[GenerationResult | Exception]] = pool.submit(
                engine.generate,
                [request("batch", LONG_PROMPT, 100, engine, n=4, lane="batch")],
                watch=batch_rows,
            )
            until(lambda: batch_rows.rows and len(batch_rows.rows[0]) >= 5, 120)
            # (and a batch line with a 0.3 s time limit, which waits behind them)
            late_call = pool.submit(
                engine.generate,
                [request("late", SHORT_PROMPT, 8, engine, lane="batch")],
                timeout_s=0.3,
            )
            # When an interactive call is made
            interactive = Recorder()
            submitted = time.monotonic()
            (short,) = engine.generate(
                [request("interactive", SHORT_PROMPT, 8, engine)], watch=interactive
            )
            waiting_then = [len(row) for row in batch_rows.rows[2:]]
            running_then = [len(row) for row in batch_rows.rows[:2]]
            (batch,) = batch_call.result(timeout=300)
            (late,) = late_call.result(timeout=300)
    finally:
        engine.batch_rows = all_rows
    # Then two batch rows ran and two waited, while the interactive row went in at once
    assert interactive.first_at is not None
    assert interactive.first_at - submitted < 0.5
    assert waiting_then == [0, 0] and min(running_then) >= 5, (waiting_then, running_then)
    assert succeeded(short).choices[0].text == expected_short.text
    # And the time limit of a row that waited counted from its call: it failed with it
    assert isinstance(late, GenerationTimeout), late
    # And the waiting rows went in as the first two ended, each with the whole text
    for choice in succeeded(batch).choices:
        assert choice.text == expected.text and choice.completion_tokens == 100


def test_a_time_limit_a_cancel_and_a_refused_row_end_their_own_call_alone(
    engine: SlowSteps, offline: Any
) -> None:
    expected = offline_choice(offline, SHORT_PROMPT, 60, temperature=0)
    # Given four calls generating at once, each in its own thread: one with a 0.5 s time
    # limit, one its follower cancels after 5 tokens, one whose prompt is past the model's
    # context (vLLM refuses its row), and a plain one
    cancelled_rows = Recorder(stop_after=5)
    too_long = request("too-long", LONG_PROMPT * 200, 4, engine)
    assert len(too_long.prompt_ids) > engine.context_length
    calls = [
        ([request("late", LONG_PROMPT, 200, engine)], {"timeout_s": 0.5}),
        ([request("cancelled", LONG_PROMPT, 200, engine)], {"watch": cancelled_rows}),
        ([too_long], {}),
        ([request("plain", SHORT_PROMPT, 60, engine)], {}),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(engine.generate, reqs, **kw) for reqs, kw in calls]
        refused = futures[2].exception(timeout=300)
        (late,), (cancelled,), (plain,) = (futures[i].result(timeout=300) for i in (0, 1, 3))
    # Then the late call fails with the time limit, the cancelled one keeps its 5 tokens,
    # and the refused one raises what vLLM said
    assert isinstance(late, GenerationTimeout), late
    choice = succeeded(cancelled).choices[0]
    assert choice.finish_reason == "cancelled"
    # (the tokens its follower had when it stopped the row: reported every few steps)
    assert choice.completion_tokens == cancelled_rows.stopped[0] >= 5
    assert refused is not None and "length" in str(refused).lower(), refused
    # And the plain call beside them gets its whole text, and the engine serves the next call
    assert succeeded(plain).choices[0].text == expected.text
    (after,) = engine.generate([request("after", SHORT_PROMPT, 60, engine)])
    assert succeeded(after).choices[0].text == expected.text


def test_a_streamed_row_is_reported_at_every_step_and_the_others_every_few(
    engine: SlowSteps, offline: Any
) -> None:
    expected = offline_choice(offline, SHORT_PROMPT, 60, temperature=0)
    # Given a streamed call and a plain one generating at once (steps of STEP_S or more,
    # partial output every 500 ms: the default)
    streamed, plain = Recorder(), Recorder()
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                engine.generate, [request(key, SHORT_PROMPT, 60, engine, stream=s)], watch=w
            )
            for key, s, w in (("streamed", True, streamed), ("plain", False, plain))
        ]
        results = [future.result(timeout=300) for future in futures]
    # Then the streamed row's tokens came at every step, the plain row's every few steps
    # (its first token at once), and both got the whole text
    assert streamed.reports >= 60 - 1
    assert 2 <= plain.reports <= 60 // 3
    for (result,), recorder in zip(results, (streamed, plain), strict=True):
        assert succeeded(result).choices[0].text == expected.text
        assert recorder.rows[0] == list(expected.token_ids)


def test_closing_the_engine_wakes_a_caller_still_waiting(engine: SlowSteps) -> None:
    # Given a long call generating in another thread
    rows = Recorder()
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            engine.generate([request("long", LONG_PROMPT, 200, engine)], watch=rows)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    until(lambda: rows.rows and rows.rows[0], 120)
    # When the engine is closed (the model process shuts down)
    engine.close()
    caller.join(30)
    # Then the caller is woken at once with a ModelError, and later calls are refused
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ModelError), outcome
    assert len(rows.rows[0]) < 200
    with pytest.raises(ModelError, match="closing"):
        engine.generate([request("after", SHORT_PROMPT, 4, engine)])

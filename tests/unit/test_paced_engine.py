"""The paced test engine: fixed texts of the asked lengths, one sleep per step, no torch."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from completion_queue.errors import GenerationTimeout, ModelError
from engine import GenerationRequest, GenerationResult
from engine.paced import PacedEngine

STEP_S = 0.025


def request(key: str, max_new_tokens: int, **fields: object) -> GenerationRequest:
    return GenerationRequest(key=key, prompt_ids=(1, 2, 3), max_new_tokens=max_new_tokens, **fields)  # type: ignore[arg-type]


def test_each_row_generates_its_own_budget_of_the_fixed_text() -> None:
    engine = PacedEngine(step_s=STEP_S)
    results = engine.generate([request("a", 3), request("b", 8, n=2), request("c", 1)])
    assert [type(r) for r in results] == [GenerationResult] * 3
    a, b, c = (r for r in results if isinstance(r, GenerationResult))
    assert [(ch.text, ch.completion_tokens, ch.finish_reason) for ch in a.choices] == [
        ("pac", 3, "length")
    ]
    assert [(ch.text, ch.completion_tokens) for ch in b.choices] == [("paced pa", 8)] * 2
    assert c.choices[0].text == "p"
    assert a.prompt_tokens == 3


def test_a_call_takes_its_longest_row_times_the_step_whatever_its_rows() -> None:
    engine = PacedEngine(step_s=STEP_S)
    for rows in (1, 32):
        started = time.monotonic()
        engine.generate([request(str(i), 4 if i else 12) for i in range(rows)])
        elapsed = time.monotonic() - started
        assert 12 * STEP_S <= elapsed < 12 * STEP_S + 0.25


def test_the_prompt_is_bytes_and_a_stop_string_cuts_the_text() -> None:
    engine = PacedEngine(step_s=STEP_S)
    assert engine.encode(["héllo"]) == [list("héllo".encode())]
    result = engine.generate([request("a", 10, stop=("d ",))])[0]
    assert isinstance(result, GenerationResult)
    assert (result.choices[0].text, result.choices[0].finish_reason) == ("pace", "stop")


def test_a_job_past_its_time_limit_fails_alone() -> None:
    engine = PacedEngine(step_s=STEP_S)
    short, long = engine.generate([request("a", 2), request("b", 400)], timeout_s=0.2)
    assert isinstance(short, GenerationResult)
    assert isinstance(long, GenerationTimeout)


def test_logprobs_and_response_formats_fail_their_job_with_a_clear_error() -> None:
    engine = PacedEngine(step_s=STEP_S)
    plain, logprobs, formatted = engine.generate(
        [request("a", 2), request("b", 2, logprobs=1), request("c", 2, response_format="{}")]
    )
    assert isinstance(plain, GenerationResult)
    assert isinstance(logprobs, ModelError) and "logprobs" in str(logprobs)
    assert isinstance(formatted, ModelError) and "response_format" in str(formatted)


class StopSecondRow:
    """A follower that records each step and stops row 1 after its third token."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def follow(self, requests: Sequence[GenerationRequest]) -> StopSecondRow:
        return self

    def step(self, last: Sequence[int]) -> list[int]:
        self.steps.append(list(last))
        return [1] if len(self.steps) == 3 else []

    def cancelled_at(self, index: int) -> int | None:
        return 3 if index == 1 else None


def test_the_follower_sees_every_step_and_stops_the_rows_it_names() -> None:
    engine = PacedEngine(step_s=STEP_S)
    watch = StopSecondRow()
    kept, stopped = engine.generate([request("a", 6), request("b", 6)], watch=watch)  # type: ignore[arg-type]
    assert len(watch.steps) == 6
    assert watch.steps[0] == [ord("p"), ord("p")]
    assert watch.steps[3] == [ord("e"), engine.pad_id]
    assert isinstance(kept, GenerationResult) and isinstance(stopped, GenerationResult)
    assert kept.choices[0].text == "paced "
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("pac", "cancelled")


def test_a_step_must_be_positive() -> None:
    with pytest.raises(ValueError, match="step_s must be > 0, got 0"):
        PacedEngine(step_s=0)


def test_the_engine_imports_no_torch() -> None:
    code = "import sys, engine.paced; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

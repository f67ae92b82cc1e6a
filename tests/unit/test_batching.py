"""Batch planning and stop handling: results always return to the right job."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.batching import GenerationRequest, cut_at_stop, plan_groups


def request(key: str, prompt_len: int, new: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(key=key, prompt_ids=(1,) * prompt_len, max_new_tokens=new, n=n)


def test_groups_respect_max_rows_counting_n() -> None:
    requests = [request("a", 3, 8, n=3), request("b", 3, 8, n=2), request("c", 3, 8)]
    groups = plan_groups(requests, max_rows=4)
    assert [[r.key for r in g] for g in groups] == [["a"], ["b", "c"]]


def test_groups_put_similar_budgets_and_lengths_together() -> None:
    requests = [request("long", 50, 128), request("s1", 2, 8), request("mid", 20, 32),
                request("s2", 3, 8)]  # fmt: skip
    groups = plan_groups(requests, max_rows=2)
    assert [[r.key for r in g] for g in groups] == [["s1", "s2"], ["mid", "long"]]


def test_a_job_wider_than_the_batch_still_runs_alone() -> None:
    assert [[r.key for r in g] for g in plan_groups([request("wide", 1, 4, n=8)], max_rows=4)] == [
        ["wide"]
    ]


def test_max_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows must be >= 1, got 0"):
        plan_groups([], max_rows=0)


@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 64), st.integers(1, 4)), max_size=60),
    st.integers(1, 16),
)
def test_every_request_lands_in_exactly_one_group(
    shapes: list[tuple[int, int, int]], max_rows: int
) -> None:
    requests = [request(str(i), p, m, n) for i, (p, m, n) in enumerate(shapes)]
    groups = plan_groups(requests, max_rows=max_rows)
    keys = [r.key for g in groups for r in g]
    assert sorted(keys, key=int) == [r.key for r in requests]
    for group in groups:
        assert len(group) == 1 or sum(r.n for r in group) <= max_rows


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", ["o w"], ("hell", True)),
        ("hello world", ["zz"], ("hello world", False)),
        ("a.b\nc", ["\n", "."], ("a", True)),
        ("stop at start", ["stop"], ("", True)),
        ("abc", [], ("abc", False)),
    ],
)
def test_cut_at_stop_takes_the_earliest(
    text: str, stops: list[str], expected: tuple[str, bool]
) -> None:
    assert cut_at_stop(text, stops) == expected

"""Batch planning and stop handling: results always return to the right job."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from completion_queue import ContextLengthExceeded
from engine import GenerationRequest, cut_at_stop
from workers.planner import fit_context, plan_groups


def request(key: str, prompt_len: int, new: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(key=key, prompt_ids=(1,) * prompt_len, max_new_tokens=new, n=n)


def test_groups_respect_max_rows_counting_n() -> None:
    requests = [request("a", 3, 8, n=3), request("b", 3, 8, n=2), request("c", 3, 8)]
    groups = plan_groups(requests, max_rows=4)
    assert [[r.key for r in g] for g in groups] == [["a"], ["b", "c"]]


def test_groups_put_similar_budgets_and_lengths_together() -> None:
    requests = [
        request("long", 50, 128),
        request("s1", 2, 8),
        request("mid", 20, 32),
        request("s2", 3, 8),
    ]
    groups = plan_groups(requests, max_rows=2)
    assert [[r.key for r in g] for g in groups] == [["s1", "s2"], ["mid", "long"]]


def test_a_job_wider_than_the_batch_still_runs_alone() -> None:
    assert [[r.key for r in g] for g in plan_groups([request("wide", 1, 4, n=8)], max_rows=4)] == [
        ["wide"]
    ]


def test_max_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows must be >= 1, got 0"):
        plan_groups([], max_rows=0)


def test_jobs_of_one_budget_that_share_a_header_are_grouped_together() -> None:
    # Given two 4-token headers, each shared by two jobs, and two prompts of no header,
    # in an order that, by length alone, would mix them in every group
    a, b = (7, 7, 7, 7), (9, 9, 9, 9)
    requests = [
        GenerationRequest(key="a1", prompt_ids=(*a, 1), max_new_tokens=8),
        GenerationRequest(key="b1", prompt_ids=(*b, 1, 2), max_new_tokens=8),
        GenerationRequest(key="x", prompt_ids=(3,) * 6, max_new_tokens=8),
        GenerationRequest(key="a2", prompt_ids=(*a, 1, 2, 3), max_new_tokens=8),
        GenerationRequest(key="b2", prompt_ids=(*b, 4), max_new_tokens=8),
        GenerationRequest(key="y", prompt_ids=a[:3], max_new_tokens=8),
        GenerationRequest(key="late", prompt_ids=(*a, 5), max_new_tokens=16),
    ]
    # When they are planned with a 4-token prefix, and without
    grouped = plan_groups(requests, max_rows=2, prefix_tokens=4)
    plain = plan_groups(requests, max_rows=2)
    # Then each header's jobs share a group; the budget still comes first
    assert [[r.key for r in g] for g in grouped] == [
        ["y", "x"],
        ["a1", "a2"],
        ["b2", "b1"],
        ["late"],
    ]
    assert [[r.key for r in g] for g in plain] == [["y", "a1"], ["b2", "b1"], ["x", "a2"], ["late"]]


@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 64), st.integers(1, 4)), max_size=60),
    st.integers(1, 16),
    st.integers(0, 8),
)
def test_every_request_lands_in_exactly_one_group(
    shapes: list[tuple[int, int, int]], max_rows: int, prefix_tokens: int
) -> None:
    requests = [
        GenerationRequest(key=str(i), prompt_ids=(i % 3,) * p, max_new_tokens=m, n=n)
        for i, (p, m, n) in enumerate(shapes)
    ]
    groups = plan_groups(requests, max_rows=max_rows, prefix_tokens=prefix_tokens)
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


def test_a_prompt_that_fits_is_kept_whole_even_at_the_bound() -> None:
    ids = tuple(range(12))
    # 12 prompt tokens + 4 new = 16, exactly the context
    assert fit_context(ids, max_new_tokens=4, context_length=16, truncate=False) == (ids, 0)
    assert fit_context(ids, max_new_tokens=4, context_length=16, truncate=True) == (ids, 0)


def test_a_prompt_too_long_is_refused_without_truncate() -> None:
    with pytest.raises(ContextLengthExceeded) as refused:
        fit_context(range(13), max_new_tokens=4, context_length=16, truncate=False)
    assert str(refused.value) == (
        "prompt has 13 tokens and max_new_tokens is 4: 17 exceeds the model's context of "
        "16 tokens (truncate: true would keep the prompt's last 12 tokens; "
        "`cq submit --truncate`)"
    )


def test_truncate_keeps_the_last_tokens_that_leave_room() -> None:
    kept, dropped = fit_context(list(range(30)), max_new_tokens=4, context_length=16, truncate=True)
    assert kept == tuple(range(18, 30))
    assert dropped == 18
    assert len(kept) + 4 == 16


@pytest.mark.parametrize("new", [16, 20])
def test_truncate_cannot_help_when_max_new_tokens_fills_the_context(new: int) -> None:
    with pytest.raises(ContextLengthExceeded) as refused:
        fit_context(range(3), max_new_tokens=new, context_length=16, truncate=True)
    assert "max_new_tokens must be below 16" in str(refused.value)
    assert "truncate: true" not in str(refused.value)


@given(st.integers(0, 80), st.integers(1, 40), st.integers(1, 64), st.booleans())
def test_fitted_prompts_always_fit_and_end_as_the_prompt_ends(
    length: int, new: int, context: int, truncate: bool
) -> None:
    ids = tuple(range(length))
    try:
        kept, dropped = fit_context(
            ids, max_new_tokens=new, context_length=context, truncate=truncate
        )
    except ContextLengthExceeded:
        assert length + new > context
        return
    assert len(kept) + new <= context and kept == ids[dropped:]
    assert dropped == 0 or (truncate and len(kept) + new == context)

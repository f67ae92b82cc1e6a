"""Request validation: every bad field is refused with its name and the bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from completion_queue import ValidationError
from producer.schema import CompletionRequest, Limits, validate_request

LIMITS = Limits(max_prompt_chars=100, max_new_tokens=64, max_n=4)


def refused(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_request(data, LIMITS)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "prompt must not be empty or whitespace only"),
        ({"prompt": "x" * 101}, "prompt", "prompt must be at most 100 characters long, got 101"),
        ({"prompt": b"\xff\xfe"}, "prompt", "prompt must be valid UTF-8"),
        ({"prompt": "a\ud800"}, "prompt", "lone surrogate"),
        ({"prompt": 5}, "prompt", "prompt must be a string, got int 5"),
        ({}, "prompt", "prompt is required"),
        (
            {"prompt": "x", "max_new_tokens": 65},
            "max_new_tokens",
            "max_new_tokens must be <= 64, got 65",
        ),
        (
            {"prompt": "x", "max_new_tokens": 0},
            "max_new_tokens",
            "max_new_tokens must be >= 1, got 0",
        ),
        ({"prompt": "x", "max_new_tokens": 2.0}, "max_new_tokens", "must be an integer, got float"),
        ({"prompt": "x", "top_k": 10**30}, "top_k", "top_k must be <= 1000000, got"),
        ({"prompt": "x", "stop": ["s" * 3000]}, "stop", "at most 256 characters, got 3000"),
        ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0, got -1"),
        (
            {"prompt": "x", "temperature": "hot"},
            "temperature",
            "temperature must be a number, got str",
        ),
        (
            {"prompt": "x", "temperature": True},
            "temperature",
            "temperature must be a number, got bool",
        ),
        ({"prompt": "x", "temperature": float("inf")}, "temperature", "must be a finite number"),
        ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be > 0, got 0"),
        ({"prompt": "x", "top_p": 1.01}, "top_p", "top_p must be <= 1, got 1.01"),
        ({"prompt": "x", "top_k": -3}, "top_k", "top_k must be >= 0, got -3"),
        ({"prompt": "x", "repetition_penalty": 0.0}, "repetition_penalty", "must be > 0, got 0.0"),
        ({"prompt": "x", "n": 5}, "n", "n must be <= 4, got 5"),
        ({"prompt": "x", "stop": ["a"] * 5}, "stop", "stop must have at most 4 items"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop", "stop must not contain empty strings"),
        ({"prompt": "x", "stop": [3]}, "stop[0]", "stop[0] must be a string"),
        ({"prompt": "x", "seed": -1}, "seed", "seed must be >= 0, got -1"),
        ({"prompt": "x", "seed": "7"}, "seed", "seed must be an integer, got str"),
        ({"prompt": "x", "priority": 10}, "priority", "priority must be <= 9, got 10"),
        ({"prompt": "x", "idempotency_key": ""}, "idempotency_key", "at least 1 characters"),
        ({"prompt": "x", "best_of": 5}, "best_of", "best_of is not a known parameter"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be <= 20, got 21"),
        ({"prompt": "x", "truncate": "yes"}, "truncate", "truncate must be a boolean, got str"),
        ({"prompt": "x", "truncate": 1}, "truncate", "truncate must be a boolean, got int 1"),
    ],
)
def test_each_invalid_field_is_named(data: dict[str, object], field: str, message: str) -> None:
    error = refused(data)
    assert error.field == field
    assert message in str(error)


def test_not_a_mapping_is_refused() -> None:
    assert refused(["prompt"]).field == "request"


def test_defaults_follow_openai() -> None:
    request = validate_request({"prompt": "hi", "stop": "\n"}, LIMITS)
    assert request.temperature == 1.0
    assert request.stop == ["\n"]
    assert request.params() == {
        "max_new_tokens": 16,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "n": 1,
        "stop": ["\n"],
        "seed": None,
    }


def test_truncate_is_stored_only_when_asked_for() -> None:
    # Jobs stored before the field existed must still equal their idempotent resubmits
    plain = validate_request({"prompt": "hi"}, LIMITS)
    assert plain.truncate is False and "truncate" not in plain.params()
    asked = validate_request({"prompt": "hi", "truncate": True}, LIMITS)
    assert asked.params() == {**plain.params(), "truncate": True}
    assert validate_request({"prompt": "hi", "truncate": False}, LIMITS).params() == plain.params()


def test_a_validated_request_passes_through() -> None:
    request = CompletionRequest(prompt="hi", temperature=0)
    assert validate_request(request, LIMITS) is request


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "prompt",
                "max_new_tokens",
                "temperature",
                "top_p",
                "top_k",
                "n",
                "stop",
                "seed",
                "priority",
                "repetition_penalty",
                "truncate",
                "extra",
            ]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(),
            st.text(),
            st.binary(max_size=8),
            st.lists(st.text(max_size=3), max_size=6),
        ),
    )
)
def test_no_input_crashes_validation(data: dict[str, object]) -> None:
    try:
        request = validate_request(data, LIMITS)
    except ValidationError as error:
        assert error.field
    else:
        assert request.prompt.strip() and len(request.prompt) <= 100
        assert 1 <= request.max_new_tokens <= 64 and request.temperature >= 0

"""A choice's stored logprobs reshaped into OpenAI's chat and legacy completions shapes."""

from __future__ import annotations

from typing import Any

from api.logprobs import chat_logprobs, completion_logprobs
from db import Choice


def entry(
    token: str, logprob: float, top: list[tuple[str, float]], raw: bytes | None = None
) -> Any:
    return {
        "token": token,
        "bytes": list(token.encode() if raw is None else raw),
        "logprob": logprob,
        "top_logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": v} for t, v in top],
    }


STORED = [
    entry("Hello", -0.5, [("Hello", -0.5), ("Hi", -1.5)]),
    entry(" wörld", -2.25, [(" there", -0.75), (" all", -1.0)]),
    entry("!", -0.125, [("!", -0.125), (".", -3.0)]),
]


def test_nothing_recorded_is_none_in_both_shapes() -> None:
    choice = Choice(text="Hello", finish_reason="stop", completion_tokens=1)
    assert chat_logprobs(choice) is None
    assert completion_logprobs(choice) is None


def test_chat_shape_is_the_stored_entries_under_content() -> None:
    choice = Choice(text="Hello wörld!", finish_reason="stop", completion_tokens=3, logprobs=STORED)
    assert chat_logprobs(choice) == {"content": STORED, "refusal": None}


def test_legacy_shape_lists_tokens_logprobs_alternatives_and_offsets() -> None:
    # Given a choice whose second token was sampled from outside its top 2
    choice = Choice(text="Hello wörld!", finish_reason="stop", completion_tokens=3, logprobs=STORED)
    # When it is shown in the legacy completions shape
    shown = completion_logprobs(choice)
    # Then each list has one item per token, offsets count characters (ö is one)
    assert shown == {
        "tokens": ["Hello", " wörld", "!"],
        "token_logprobs": [-0.5, -2.25, -0.125],
        "top_logprobs": [
            {"Hello": -0.5, "Hi": -1.5},
            {" there": -0.75, " all": -1.0, " wörld": -2.25},
            {"!": -0.125, ".": -3.0},
        ],
        "text_offset": [0, 5, 11],
    }
    # And the alternatives keep their descending order, the chosen token last when added
    assert [list(top.values()) for top in shown["top_logprobs"]] == [
        [-0.5, -1.5],
        [-0.75, -1.0, -2.25],
        [-0.125, -3.0],
    ]


def test_legacy_offsets_count_a_character_split_over_two_tokens_once() -> None:
    # Given "é" (two UTF-8 bytes) generated as two tokens, each decoding to U+FFFD, then "x"
    split = [
        entry("\ufffd", -1.0, [], raw=b"\xc3"),
        entry("\ufffd", -1.0, [], raw=b"\xa9"),
        entry("x", -1.0, []),
    ]
    choice = Choice(text="éx", finish_reason="length", completion_tokens=3, logprobs=split)
    # When it is shown in the legacy shape
    shown = completion_logprobs(choice)
    # Then both halves start at the character they build, and "x" at offset 1
    assert shown is not None
    assert shown["text_offset"] == [0, 0, 1]
    # And with no alternatives asked (logprobs=0) each dict holds the chosen token alone
    assert shown["top_logprobs"] == [{"\ufffd": -1.0}, {"\ufffd": -1.0}, {"x": -1.0}]


def test_legacy_alternatives_that_read_the_same_keep_the_likelier() -> None:
    same = [entry("\ufffd", -2.0, [("\ufffd", -1.0), ("\ufffd", -2.0)], raw=b"\xe2")]
    choice = Choice(text="", finish_reason="length", completion_tokens=1, logprobs=same)
    shown = completion_logprobs(choice)
    assert shown is not None
    assert shown["top_logprobs"] == [{"\ufffd": -1.0}]

"""A choice's recorded log probabilities in OpenAI's two shapes: chat's and legacy completions'.

The worker stores one entry per generated token in chat's shape (see
:class:`db.Choice`); these pure functions only reshape it.
"""

from __future__ import annotations

import codecs
from typing import Any

from db import Choice


def chat_logprobs(choice: Choice) -> dict[str, Any] | None:
    """Return ``/v1/chat/completions``' ``logprobs`` of ``choice``; None when none were recorded."""
    if choice.logprobs is None:
        return None
    return {"content": choice.logprobs, "refusal": None}


def completion_logprobs(choice: Choice) -> dict[str, Any] | None:
    """Return ``/v1/completions``' legacy ``logprobs`` of ``choice``; None when none were recorded.

    ``top_logprobs`` holds, per token, the alternatives as ``{token: logprob}`` in
    descending order, plus the chosen token when it is not among them (OpenAI:
    "up to logprobs+1 elements"); of alternatives that read the same, the likelier
    stays. ``text_offset`` is each token's character offset in the completion text.
    """
    if choice.logprobs is None:
        return None
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    # Offsets count the characters of the text decoded so far; a token that ends inside
    # a UTF-8 character adds that character only once the next token completes it.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    for entry in choice.logprobs:
        tokens.append(entry["token"])
        token_logprobs.append(entry["logprob"])
        top: dict[str, float] = {}
        for alternative in entry["top_logprobs"]:
            top.setdefault(alternative["token"], alternative["logprob"])
        top.setdefault(entry["token"], entry["logprob"])
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(decoder.decode(bytes(entry["bytes"])))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }

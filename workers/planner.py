"""Micro-batch planning: which claimed jobs share one ``generate`` call.

Pure logic, no torch. Every sampling parameter is applied per row by the
engine, so any jobs may share a call; what grouping buys is less padding and
less waiting for the longest request, so rows are grouped by token budget and
prompt length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from completion_queue import ContextLengthExceeded
from engine import GenerationRequest


def fit_context(
    prompt_ids: Sequence[int], *, max_new_tokens: int, context_length: int, truncate: bool
) -> tuple[tuple[int, ...], int]:
    """Return the prompt ids that leave room for ``max_new_tokens``, and how many were dropped.

    A prompt that fits is kept whole. One that does not is refused, or, when the
    request asks for ``truncate``, cut to its last tokens: the completion goes on
    from the end of the prompt, as it would have.

    Raises:
        ContextLengthExceeded: the prompt does not fit and ``truncate`` is off, or
            ``max_new_tokens`` alone leaves no room for any prompt token.
    """
    room = context_length - max_new_tokens
    if len(prompt_ids) <= room:
        return tuple(prompt_ids), 0
    needed = len(prompt_ids) + max_new_tokens
    problem = (
        f"prompt has {len(prompt_ids)} tokens and max_new_tokens is {max_new_tokens}: "
        f"{needed} exceeds the model's context of {context_length} tokens"
    )
    if room < 1:
        raise ContextLengthExceeded(
            f"{problem}; max_new_tokens must be below {context_length} to leave room for "
            "a prompt, even a truncated one"
        )
    if not truncate:
        raise ContextLengthExceeded(
            f"{problem} (truncate: true would keep the prompt's last {room} tokens; "
            "`cq submit --truncate`)"
        )
    return tuple(prompt_ids[-room:]), len(prompt_ids) - room


def plan_groups(
    requests: Sequence[GenerationRequest], *, max_rows: int, prefix_tokens: int = 0
) -> list[list[GenerationRequest]]:
    """Split ``requests`` into groups of at most ``max_rows`` rows (a job counts ``n`` rows).

    Requests are ordered by token budget, then prompt length, so each group pads
    little and stops near the same step. With ``prefix_tokens`` (the worker's
    ``CQ_PREFIX_MIN_TOKENS``), requests of one budget whose prompts start with the
    same ``prefix_tokens`` tokens sit next to each other, so their group can compute
    the shared prefix once (:mod:`engine.prefix`). Every request lands in exactly
    one group.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    heads: Counter[tuple[int, ...]] = Counter()
    if prefix_tokens > 0:
        heads.update(r.prompt_ids[:prefix_tokens] for r in requests if _has_head(r, prefix_tokens))

    def order(request: GenerationRequest) -> tuple[int, tuple[int, ...], int]:
        head = request.prompt_ids[:prefix_tokens] if _has_head(request, prefix_tokens) else ()
        shared = head if heads[head] > 1 else ()
        return request.max_new_tokens, shared, len(request.prompt_ids)

    ordered = sorted(requests, key=order)
    groups: list[list[GenerationRequest]] = []
    current: list[GenerationRequest] = []
    rows = 0
    for request in ordered:
        if current and rows + request.n > max_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(request)
        rows += request.n
    if current:
        groups.append(current)
    return groups


def _has_head(request: GenerationRequest, prefix_tokens: int) -> bool:
    """True when ``request``'s prompt is long enough to share a prefix of ``prefix_tokens``."""
    return prefix_tokens > 0 and len(request.prompt_ids) > prefix_tokens

"""What an engine takes and gives: one request per job, one result per request.

Plain frozen dataclasses with no torch, Celery or SQL, so the queue side, the
planner and ``cq bench`` build and read them without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One job as an engine sees it: token ids and sampling parameters."""

    key: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Prompt tokens dropped from the start so the prompt fits the context (``truncate``).
    truncated_prompt_tokens: int = 0
    #: Log probabilities to record per generated token: None for none, else how many
    #: alternatives besides the chosen token (0 to 20).
    logprobs: int | None = None
    #: The job's ``response_format`` as compact JSON (keys in order); None: unconstrained.
    response_format: str | None = None
    #: The job's priority, 0 (normal) to 9 (most urgent): an engine that queues rows
    #: (vLLM's priority scheduling) starts the more urgent first; the others ignore it.
    priority: int = 0
    #: The job's lane, ``interactive`` (a caller waits) or ``batch`` (batch lines): an
    #: engine that queues rows starts interactive rows before batch lines.
    lane: str = "interactive"
    #: A caller reads this job's tokens as they come (``stream``): an engine that reports
    #: rows' tokens every few steps (vLLM's, :func:`engine.vllm.output_interval`) reports
    #: these at every step.
    stream: bool = False

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0, as in OpenAI's API)."""
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """True when ``generate``'s own arg-max decodes this row exactly: greedy, no penalty."""
        return self.greedy and self.repetition_penalty == 1.0


@dataclass(frozen=True, slots=True)
class GeneratedChoice:
    """One completion an engine generated for a request (a row stores it as a choice)."""

    text: str
    #: ``stop``, ``length`` or ``cancelled``.
    finish_reason: str
    completion_tokens: int
    #: Per kept token, when the request asked for logprobs: OpenAI's chat shape,
    #: ``{"token", "bytes", "logprob", "top_logprobs": [{"token", "bytes", "logprob"}]}``.
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What one request produced: its choices and its prompt's token count."""

    choices: list[GeneratedChoice]
    prompt_tokens: int


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Return ``text`` cut before the earliest stop string, and whether one was found."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if 0 <= index < cut:
            cut = index
    return text[:cut], cut < len(text)


def end_row(
    request: GenerationRequest,
    tokens: Sequence[int],
    *,
    ends: Collection[int],
    decode: Callable[[list[int]], str],
    cancelled_at: int | None = None,
) -> tuple[list[int], str, str]:
    """Cut a row's generated tokens as every engine does; return the kept tokens, text, finish.

    The row keeps at most ``max_new_tokens`` tokens; a row a cancel stopped keeps its
    first ``cancelled_at`` and ends ``cancelled`` (unless it had ended before); the first
    of ``ends`` (EOS, padding) ends it with ``stop``, and so does the earliest stop string,
    cut from the decoded text.
    """
    kept = list(tokens[: request.max_new_tokens])
    finish = "length"
    if cancelled_at is not None and cancelled_at < len(kept):
        kept, finish = kept[:cancelled_at], "cancelled"
    elif cancelled_at is not None and cancelled_at < request.max_new_tokens:
        finish = "cancelled"
    for i, token in enumerate(kept):
        if token in ends:
            kept, finish = kept[:i], "stop"
            break
    text = decode(kept)
    if request.stop:
        text, found = cut_at_stop(text, request.stop)
        if found:
            finish = "stop"
    return kept, text, finish

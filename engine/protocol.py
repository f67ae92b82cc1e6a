"""What an engine must do, and what it needs of whoever follows its rows.

An engine runs :class:`~engine.types.GenerationRequest` s on one resident model
and returns one :class:`~engine.types.GenerationResult` (or an exception) per
request. It says which requests it runs exactly (:meth:`Engine.runs`), so the
queue side can hand the others to an engine that can (:class:`engine.routing.Routed`).

A :class:`Follower` is how the queue side watches a call while it runs: the
engine reports every step's tokens of every row, and stops the rows the
follower names (a job cancelled, or claimed again elsewhere). The worker's
progress writer is one; the engine knows nothing of rows in SQL or streams in Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from engine.types import GenerationRequest, GenerationResult


class FollowedRows(Protocol):
    """The rows of one engine call (each request's ``n`` rows, in order), as they generate."""

    def step(self, last: Sequence[int]) -> list[int]:
        """Take one decoding step's new token of every row; return the rows to stop now."""
        ...

    def set(self, index: int, tokens: list[int]) -> None:
        """Replace row ``index``'s tokens with all it generated so far (an engine that streams)."""
        ...

    def finish(self, index: int) -> None:
        """Mark row ``index`` ended."""
        ...

    def tokens(self, index: int) -> list[int]:
        """Row ``index``'s tokens so far."""
        ...

    def tick(self) -> None:
        """Let the follower look for rows to stop when no step was reported for a while."""
        ...

    def to_stop(self) -> list[int]:
        """Return the rows newly stopped since the last call (their jobs are no longer held)."""
        ...

    def cancelled_at(self, index: int) -> int | None:
        """How many tokens row ``index`` kept when it was stopped, or None if it was not."""
        ...


class Follower(Protocol):
    """Follows an engine's calls: progress, streamed deltas, cancels."""

    def follow(self, requests: Sequence[GenerationRequest]) -> FollowedRows:
        """Start following ``requests``' rows, in the engine's order."""
        ...


class Engine(Protocol):
    """A resident model that runs batches of requests."""

    #: Longest prompt plus new tokens the model takes.
    context_length: int
    #: The model's tokenizer (chat jobs are rendered with its template).
    tokenizer: Any

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each prompt."""
        ...

    def runs(self, request: GenerationRequest) -> bool:
        """True when this engine runs ``request`` exactly as it asks (every feature it uses)."""
        ...

    def warm_up(self) -> None:
        """Run one small request, so the first real batch pays no start-up cost."""
        ...

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        timeout_s: float | None = None,
        watch: Follower | None = None,
    ) -> list[GenerationResult | Exception]:
        """Return one result per request, in order (an exception for a job past ``timeout_s``).

        ``watch`` follows the rows' tokens and stops those of jobs no longer held.
        """
        ...

    def close(self) -> None:
        """Stop any background work (the process is shutting down)."""
        ...

"""One engine in front of another: each request to the first engine that runs it exactly.

The continuous engine runs plain greedy rows only; a worker serving it puts the
static engine behind it, so a seeded, sampled, penalized, logprobs or grammar
job means the same under either setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.protocol import Engine, Follower
from engine.types import GenerationRequest, GenerationResult


class Routed:
    """``primary`` runs what it can; ``fallback`` (which must run everything) the rest."""

    def __init__(self, primary: Engine, fallback: Engine) -> None:
        self.primary = primary
        self.fallback = fallback
        self.context_length = min(primary.context_length, fallback.context_length)
        self.tokenizer: Any = primary.tokenizer

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each prompt (both engines share the tokenizer)."""
        return self.primary.encode(prompts)

    def runs(self, request: GenerationRequest) -> bool:
        """True when either engine runs ``request``."""
        return self.primary.runs(request) or self.fallback.runs(request)

    def warm_up(self) -> None:
        """Warm both engines."""
        self.fallback.warm_up()
        self.primary.warm_up()

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        timeout_s: float | None = None,
        watch: Follower | None = None,
    ) -> list[GenerationResult | Exception]:
        """Run each request on the first engine that runs it; results in ``requests``' order."""
        first = [r for r in requests if self.primary.runs(r)]
        rest = [r for r in requests if not self.primary.runs(r)]
        results: dict[str, GenerationResult | Exception] = {}
        for engine, part in ((self.fallback, rest), (self.primary, first)):
            if part:
                done = engine.generate(part, timeout_s=timeout_s, watch=watch)
                results.update(zip((r.key for r in part), done, strict=True))
        return [results[r.key] for r in requests]

    def close(self) -> None:
        """Close both engines."""
        self.primary.close()
        self.fallback.close()

"""Benchmark workloads: prompts of chosen token lengths, uniform and mixed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

TEXT = (
    "The queue takes a job, the worker takes a batch, and the database keeps the result. "
    "Once upon a time there was a small model that lived on a very fast machine. "
    "It read every prompt it was given and wrote a few words in return. "
    "The weather today is cold and clear, with wind from the north and snow on the hills. "
    "Redis is an in-memory data store used as a database, cache and message broker. "
)


@dataclass(frozen=True, slots=True)
class Item:
    """One benchmark request: its prompt and token budget."""

    prompt: str
    max_new_tokens: int

    def request(self) -> dict[str, Any]:
        """The client request: greedy, so every engine does the same work."""
        return {"prompt": self.prompt, "max_new_tokens": self.max_new_tokens, "temperature": 0.0}


def prompt_of_length(tokenizer: Any, length: int, offset: int) -> str:
    """Return a prompt of about ``length`` tokens cut from the benchmark text."""
    ids = tokenizer(TEXT * (1 + length // 20), add_special_tokens=False)["input_ids"]
    start = offset % max(1, len(ids) - length)
    return str(tokenizer.decode(ids[start : start + length])).strip() or "x"


def uniform(tokenizer: Any, jobs: int, new_tokens: int, seed: int = 0) -> list[Item]:
    """``jobs`` prompts of 8 to 48 tokens, each asking for ``new_tokens``."""
    rng = random.Random(seed)
    return [
        Item(prompt_of_length(tokenizer, rng.randint(8, 48), rng.randint(0, 10_000)), new_tokens)
        for _ in range(jobs)
    ]


def mixed(tokenizer: Any, jobs: int, seed: int = 1) -> list[Item]:
    """Closer to real traffic: prompts of 4 to 200 tokens, budgets of 8 to 128, in random order."""
    rng = random.Random(seed)
    return [
        Item(
            prompt_of_length(tokenizer, rng.randint(4, 200), rng.randint(0, 10_000)),
            rng.randint(8, 128),
        )
        for _ in range(jobs)
    ]


def shared_prefix(tokenizer: Any, jobs: int, prefix_tokens: int, new_tokens: int) -> list[Item]:
    """``jobs`` prompts that start with the same ``prefix_tokens``-token header.

    Each ends with a short question of its own (4 to 12 tokens), as in a batch of
    jobs that share a system prompt or few-shot examples.
    """
    header = prompt_of_length(tokenizer, prefix_tokens, 7)
    rng = random.Random(2)
    return [
        Item(
            f"{header}\n\nQuestion {i}: {prompt_of_length(tokenizer, rng.randint(2, 10), i)}?\n",
            new_tokens,
        )
        for i in range(jobs)
    ]

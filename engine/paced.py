"""A test and benchmark engine with no model: every decoding step is a sleep of ``step_s``.

``CQ_ENGINE=paced`` runs it. It loads no weights and imports no torch, so many
workers fit on one small machine, and each generates at a fixed pace without
using the CPU, as a big model on its own GPU would: one call of any number of
rows takes ``max_new_tokens * step_s`` of its longest row. Each row generates
exactly its ``max_new_tokens`` tokens (the text ``paced paced pa...``), unless
a cancel, a stop string or the time limit ends it. The control-plane bench
(``benchmarks/control_plane.py``) measures the queue side with it: Redis, the
database and the workers' main processes, not a model.

Its tokenizer is bytes: one token per UTF-8 byte of the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from completion_queue.errors import GenerationTimeout, ModelError
from engine.protocol import Follower
from engine.types import GeneratedChoice, GenerationRequest, GenerationResult, end_row

#: The text every row generates, one byte per step, over and over.
PACED_TEXT = b"paced "


class ByteTokenizer:
    """One token per UTF-8 byte; ids 256 and 257 end and pad a row. No chat template."""

    eos_token_id = 256
    pad_token_id = 257
    chat_template = None

    def encode(self, text: str) -> list[int]:
        """Return the bytes of ``text`` as token ids."""
        return list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids`` (the special ids are always skipped)."""
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class PacedEngine:
    """Sleeps ``step_s`` per decoding step and returns fixed texts of the asked lengths."""

    device = "paced"
    dtype = "none"
    threads = 0

    def __init__(self, *, step_s: float, context_length: int = 1 << 20) -> None:
        if step_s <= 0:
            raise ValueError(f"step_s must be > 0, got {step_s}")
        self.step_s = step_s
        self.context_length = context_length
        self.tokenizer = ByteTokenizer()
        self.eos_ids = [ByteTokenizer.eos_token_id]
        self.pad_id = ByteTokenizer.pad_token_id

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the bytes of each prompt."""
        return [self.tokenizer.encode(prompt) for prompt in prompts]

    def runs(self, request: GenerationRequest) -> bool:
        """True: a request asking for logprobs or a response format fails with a clear error."""
        return True

    def warm_up(self) -> None:
        """Nothing to warm: there is no model."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        timeout_s: float | None = None,
        watch: Follower | None = None,
    ) -> list[GenerationResult | Exception]:
        """Sleep one step per token of the longest row; results in ``requests``' order.

        ``watch`` sees every step's tokens and stops the rows it names, as with the
        model engines. A request still generating ``timeout_s`` seconds after the call
        began gets a :class:`GenerationTimeout`.
        """
        refused: dict[int, GenerationResult | Exception] = {}
        for index, request in enumerate(requests):
            error = self._refusal(request)
            if error is not None:
                refused[index] = error
        runnable = [r for i, r in enumerate(requests) if i not in refused]
        rows = [r for r in runnable for _ in range(r.n)]
        tokens: list[list[int]] = [[] for _ in rows]
        view = watch.follow(runnable) if watch is not None and rows else None
        started = time.monotonic()
        deadline = started + timeout_s if timeout_s is not None else None
        live = {i for i, row in enumerate(rows) if row.max_new_tokens > 0}
        step = 0
        timed_out = False
        while live:
            step += 1
            # Steps on an absolute schedule: the pace does not drift with the follower's writes.
            time.sleep(max(0.0, started + step * self.step_s - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            token = PACED_TEXT[(step - 1) % len(PACED_TEXT)]
            for i in live:
                tokens[i].append(token)
            stopped: list[int] = []
            if view is not None:
                # As a batched generate does, a row that has ended is handed padding.
                stopped = view.step([token if i in live else self.pad_id for i in range(len(rows))])
            live = {i for i in live if len(tokens[i]) < rows[i].max_new_tokens} - set(stopped)
        choices = [
            self._choice(row, tokens[i], view.cancelled_at(i) if view is not None else None)
            for i, row in enumerate(rows)
        ]
        results = dict(refused)
        offset = 0
        for index, request in enumerate(requests):
            if index in refused:
                continue
            mine = choices[offset : offset + request.n]
            offset += request.n
            if timed_out and any(
                c.finish_reason == "length" and c.completion_tokens < request.max_new_tokens
                for c in mine
            ):
                results[index] = GenerationTimeout(
                    f"generation exceeded the job time limit of {timeout_s:g}s "
                    f"(CQ_JOB_TIMEOUT_S) after {max(c.completion_tokens for c in mine)} tokens"
                )
            else:
                results[index] = GenerationResult(
                    choices=mine, prompt_tokens=len(request.prompt_ids)
                )
        return [results[i] for i in range(len(requests))]

    def _refusal(self, request: GenerationRequest) -> ModelError | None:
        """The error of a request asking for what a model-free engine cannot give."""
        if request.logprobs is not None:
            return ModelError("the paced test engine has no model: logprobs are not available")
        if request.response_format is not None:
            return ModelError(
                "the paced test engine has no model: response_format is not available"
            )
        return None

    def _choice(
        self, row: GenerationRequest, tokens: list[int], cancelled_at: int | None
    ) -> GeneratedChoice:
        kept, text, finish = end_row(
            row,
            tokens,
            ends={*self.eos_ids, self.pad_id},
            decode=self.tokenizer.decode,
            cancelled_at=cancelled_at,
        )
        return GeneratedChoice(text=text, finish_reason=finish, completion_tokens=len(kept))

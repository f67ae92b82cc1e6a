"""The continuous engine: transformers' own continuous batching, kept running in the worker.

A persistent ``ContinuousBatchingManager`` (``model.init_continuous_batching``,
paged KV cache, ``sdpa`` attention) schedules rows token by token: a row that
finishes frees its slot for the next one at once, so short jobs never wait for
the longest job of their batch. That wins on GPUs with mixed lengths; on a few
CPU cores its per-step scheduling costs more than it saves (see
docs/benchmarks.md).

It runs plain greedy rows (:meth:`ContinuousEngine.runs`). Rows whose exact
semantics it cannot promise (sampling with a per-job seed, repetition penalty, or
any sampling at all, whose draws the manager shares across requests) and rows
that need a logits processor of their own (logprobs, a ``response_format``
grammar) go to the static engine of the same process (:class:`engine.Routed`),
so every job means the same under either engine. Stop sequences are cut from
the text afterwards, and EOS ends a row, as in the static engine. A job still
generating ``CQ_JOB_TIMEOUT_S`` after its rows were added is cancelled in the
manager and fails with ``GenerationTimeout``, as in the static engine.

With a :class:`~engine.protocol.Follower` (progress in the rows, streamed jobs,
cancels), rows are added in the manager's streaming mode, so each step's tokens
reach the watch; a cancelled job's rows are cancelled in the manager, which frees
their slots for the next rows at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from transformers import ContinuousBatchingConfig, GenerationConfig

from completion_queue import FatalModelError, GenerationTimeout, ModelError
from engine.protocol import Follower
from engine.static import StaticEngine
from engine.types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

#: Longest wait for the manager's next result before it counts as stalled.
RESULT_TIMEOUT_S = 600.0


def continuous_row(request: GenerationRequest) -> bool:
    """True when the manager runs ``request`` exactly: plain greedy, no processor of its own."""
    return request.plain_greedy and request.logprobs is None and request.response_format is None


class ContinuousEngine:
    """Continuous batching for greedy rows, on the model a :class:`StaticEngine` loaded."""

    def __init__(self, static: StaticEngine, *, max_new_tokens: int, max_rows: int) -> None:
        self.static = static
        self.context_length = static.context_length
        self.tokenizer = static.tokenizer
        model = static.model
        model.set_attn_implementation("sdpa")
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=static.eos_ids or None,
            pad_token_id=static.pad_id,
        )
        # At most max_rows rows per step. On CPU the paged cache would otherwise take most
        # of the host's free memory: size it for max_rows rows of full context.
        page_size = 256
        num_blocks = None
        if static.device.type == "cpu":
            num_blocks = math.ceil(max_rows * self.context_length / page_size)
        cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=num_blocks, max_requests_per_batch=max_rows
        )
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb_config
        )
        self.manager.start()
        self._counter = 0

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each prompt."""
        return self.static.encode(prompts)

    def warm_up(self) -> None:
        """Run one request through the manager so the first real flush pays no start-up."""
        ids = self.encode(["Hello, world"])[0] or [self.static.pad_id]
        self.generate(
            [
                GenerationRequest(
                    key="warm-up", prompt_ids=tuple(ids), max_new_tokens=2, temperature=0.0
                )
            ]
        )

    def runs(self, request: GenerationRequest) -> bool:
        """True when the manager runs ``request`` exactly: plain greedy, no processor of its own."""
        return continuous_row(request)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        timeout_s: float | None = None,
        watch: Follower | None = None,
    ) -> list[GenerationResult | Exception]:
        """Run ``requests`` (each one this engine :meth:`runs`) through the manager.

        A job still generating ``timeout_s`` seconds after it started gets a
        :class:`GenerationTimeout` in place of its result, as in the static engine.
        """
        refused = [r.key for r in requests if not continuous_row(r)]
        if refused:
            raise ValueError(f"the continuous engine does not run requests {refused}")
        results = self._continuous(requests, timeout_s, watch)
        return [results[r.key] for r in requests]

    def _continuous(
        self, requests: Sequence[GenerationRequest], timeout_s: float | None, watch: Follower | None
    ) -> dict[str, GenerationResult | Exception]:
        started = time.monotonic()
        view = watch.follow(requests) if watch is not None else None
        ids: dict[str, tuple[GenerationRequest, int]] = {}
        rows: dict[str, int] = {}
        for request in requests:
            for choice in range(request.n):
                self._counter += 1
                request_id = f"{self._counter}:{choice}"
                self.manager.add_request(
                    list(request.prompt_ids),
                    request_id=request_id,
                    max_new_tokens=request.max_new_tokens,
                    streaming=view is not None,
                )
                rows[request_id] = len(ids)
                ids[request_id] = (request, choice)
        index_ids = list(ids)
        tokens: dict[str, list[int]] = {}
        stalled_at = started + RESULT_TIMEOUT_S
        job_deadline = started + timeout_s if timeout_s is not None else math.inf
        while len(tokens) < len(ids):
            if time.monotonic() >= job_deadline:
                break
            wait_s = min(1.0, max(0.01, job_deadline - time.monotonic()))
            output: Any = self.manager.get_result(timeout=wait_s)
            if view is not None:
                if output is not None and output.request_id in rows:
                    view.set(rows[output.request_id], list(output.generated_tokens))
                else:
                    view.tick()
                for index in view.to_stop():
                    # A cancelled job: its slot goes to the next row at once.
                    request_id = index_ids[index]
                    self.manager.cancel_request(request_id)
                    tokens[request_id] = view.tokens(index)
            if output is None:
                if not self.manager.is_running():
                    raise FatalModelError("the continuous batching manager stopped")
                if time.monotonic() > stalled_at:
                    raise ModelError("continuous batching produced no result in time")
                continue
            if output.request_id not in ids or not output.is_finished():
                continue
            if output.error:
                raise ModelError(f"continuous batching failed: {output.error}")
            tokens[output.request_id] = list(output.generated_tokens)
            if view is not None:
                view.finish(rows[output.request_id])
        unfinished = ids.keys() - tokens.keys()
        for request_id in unfinished:
            # Free its slot; a result it still delivers has an id no later call waits for.
            self.manager.cancel_request(request_id)
        late = {ids[i][0].key for i in unfinished}
        choices: dict[str, list[Any]] = {r.key: [None] * r.n for r in requests}
        for request_id, (request, choice) in ids.items():
            if request.key not in late:
                cancelled_at = view.cancelled_at(rows[request_id]) if view is not None else None
                choices[request.key][choice] = self.static.choice(
                    request, tokens[request_id], cancelled_at=cancelled_at
                )
        return {
            r.key: GenerationTimeout(
                f"generation exceeded the job time limit of {timeout_s:g}s (CQ_JOB_TIMEOUT_S)"
            )
            if r.key in late
            else GenerationResult(choices=choices[r.key], prompt_tokens=len(r.prompt_ids))
            for r in requests
        }

    def close(self) -> None:
        """Stop the manager's generation thread."""
        self.manager.stop(block=True, timeout=10)

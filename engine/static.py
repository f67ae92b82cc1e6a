"""The static engine: load the model once, warm up, and run one batched ``generate`` per group.

Each row decodes with its own parameters (see :mod:`engine.sampling`), so any jobs
may share one call, and every request feature runs here.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Cache,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from completion_queue import (
    FatalModelError,
    GenerationTimeout,
    ModelError,
    OutOfMemory,
    UnsupportedResponseFormat,
)
from engine.devices import resolve_device, resolve_dtype, set_model_threads
from engine.grammar import ConstrainedRows, Grammars
from engine.kvcache import growing_cache
from engine.layers import pack_linears, packing_applies
from engine.logprobs import LogprobRecorder, RowLogprobs, TokenSpeller, stored_logprobs
from engine.prefix import pad_rows, prefix_cache, shared_prefix_len, sharing
from engine.protocol import Follower
from engine.sampling import RowSampler, RowStops
from engine.types import GeneratedChoice, GenerationRequest, GenerationResult, end_row

log = logging.getLogger(__name__)

#: How many times a model was loaded in this process (the tests assert it stays 1).
LOAD_COUNT = 0


def eos_ids(tokenizer_eos: int | None, config_eos: int | Sequence[int] | None) -> list[int]:
    """Return the tokens that end a row: the tokenizer's EOS, then the generation config's."""
    listed = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    ids = [tokenizer_eos] if tokenizer_eos is not None else []
    return list(dict.fromkeys(ids + [int(i) for i in listed]))


class StaticEngine:
    """A causal LM and its tokenizer, loaded once and kept resident in this process."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        prefix_min_tokens: int = 0,
    ) -> None:
        global LOAD_COUNT
        started = time.perf_counter()
        self.name = model
        #: A group whose rows all share this many prompt tokens computes them once (0: never).
        self.prefix_min_tokens = prefix_min_tokens
        #: Attention reads a group's shared prefix once per step (False: from every row's copy).
        self.cascade_attention = True
        #: Other groups' KV caches grow in place by chunks (False: transformers' default).
        self.growing_kv_cache = True
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        #: torch's CPU threads in this process (CQ_TORCH_THREADS).
        self.threads = set_model_threads(threads, self.device)
        # Its progress bars would reach the worker's log as WARNING lines (Celery redirects
        # stderr); the load time is logged below.
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype)
        self.model.to(self.device).eval()
        #: Linear layers whose weights are prepacked for oneDNN (bfloat16 on CPU; 0: none).
        self.packed_layers = 0
        if packing_applies(self.model, self.dtype, self.device):
            self.packed_layers = pack_linears(self.model)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos if eos is not None else 0
        self.eos_id: int | None = eos
        #: Every token that ends a row: the tokenizer's EOS, then the generation config's
        #: (chat models list several, e.g. ``<|endoftext|>`` and ``<|im_end|>``).
        self.eos_ids: list[int] = eos_ids(eos, self.model.generation_config.eos_token_id)
        self.pad_id: int = pad
        self.spell = TokenSpeller(self.tokenizer)
        self.grammars: Grammars | None = None
        config = self.model.config
        self.context_length: int = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or self.tokenizer.model_max_length
        )
        LOAD_COUNT += 1
        self.load_s = time.perf_counter() - started
        log.info(
            "loaded model %s on %s (%s, %d prepacked layers) in %.2fs [load #%d in pid %d]",
            model,
            self.device,
            self.dtype,
            self.packed_layers,
            self.load_s,
            LOAD_COUNT,
            os.getpid(),
        )

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each prompt."""
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def warm_up(self) -> None:
        """Run one small generation so the first real batch pays no start-up cost."""
        ids = self.encode(["Hello, world"])[0] or [self.pad_id]
        self.generate([GenerationRequest(key="warm-up", prompt_ids=tuple(ids), max_new_tokens=2)])

    def runs(self, request: GenerationRequest) -> bool:
        """True: every feature a request may ask for runs here, row by row."""
        return True

    def close(self) -> None:
        """Nothing runs in the background; the model is freed with the process."""

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        timeout_s: float | None = None,
        watch: Follower | None = None,
    ) -> list[GenerationResult | Exception]:
        """Run ``requests`` in one left-padded ``generate`` call; results in the same order.

        When every row's prompt starts with the same ``prefix_min_tokens`` tokens or
        more, those are computed once for all rows (see :mod:`engine.prefix`).

        A request still generating ``timeout_s`` seconds after the call began gets a
        :class:`GenerationTimeout` in place of its result; the others keep theirs.
        ``watch`` sees every step's tokens (progress, streams) and stops the rows of
        cancelled jobs; their choices end ``cancelled``.

        Raises:
            OutOfMemory: the accelerator ran out of memory (a smaller batch may fit).
            FatalModelError: the CUDA context is unusable; the process must exit.
            ModelError: ``generate`` failed for another reason.
        """
        if not requests:
            return []
        refused = self._refuse_formats(requests)
        if refused:
            # A response format that does not compile fails its job alone.
            kept = iter(
                self.generate(
                    [r for i, r in enumerate(requests) if i not in refused],
                    timeout_s=timeout_s,
                    watch=watch,
                )
            )
            return [refused[i] if i in refused else next(kept) for i in range(len(requests))]
        rows = [r for r in requests for _ in range(r.n)]
        prompts = [r.prompt_ids for r in rows]
        # A shared prefix changes the logits' last bits (another attention path), so a
        # seeded row would sample otherwise than alone: seeded groups compute everything.
        seeded = any(r.seed is not None for r in rows)
        shared = 0 if seeded else shared_prefix_len(prompts, self.prefix_min_tokens)
        input_ids, attention, starts = pad_rows(prompts, self.pad_id, shared)
        prompt_len = input_ids.shape[1]
        max_new = max(r.max_new_tokens for r in rows)
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids or None,
            use_cache=True,
        )
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        # Plain greedy rows need no sampler: generate's own arg-max does exactly that,
        # a little faster per step.
        processors = LogitsProcessorList()
        recorder = None
        if any(r.logprobs is not None for r in rows):
            # First: it records the raw scores, before any mask or sampling transform.
            recorder = LogprobRecorder(rows)
            processors.append(recorder)
        constrained = None
        if any(r.response_format is not None for r in rows):
            # Before sampling: a row draws only from what its grammar allows next.
            formats = [r.response_format for r in rows]
            constrained = ConstrainedRows(self._grammars(), formats, self.device)
            processors.append(constrained)
        if not all(r.plain_greedy for r in rows):
            generators = [self._generator(r.seed, c) for r in requests for c in range(r.n)]
            processors.append(RowSampler(rows, generators, starts.to(self.device), self.device))
        view = watch.follow(requests) if watch is not None else None
        stops = RowStops(rows, prompt_len, self.tokenizer, self.device, deadline, view)
        criteria = StoppingCriteriaList()
        if view or deadline is not None or any(r.stop or r.max_new_tokens != max_new for r in rows):
            criteria.append(stops)
        try:
            with torch.inference_mode():
                input_ids = input_ids.to(self.device)
                cache = self._cache(input_ids[:1, :shared], len(rows), prompt_len + max_new)
                with sharing(shared if self.cascade_attention else 0):
                    output = self._run_model(
                        input_ids=input_ids,
                        attention_mask=attention.to(self.device),
                        generation_config=config,
                        logits_processor=processors,
                        stopping_criteria=criteria,
                        cache=cache,
                    )
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory generating {len(rows)} rows: {exc}") from exc
        except RuntimeError as exc:
            if "CUDA error" in str(exc):
                raise FatalModelError(f"CUDA failure in generate: {exc}") from exc
            raise ModelError(f"generate failed: {exc}") from exc
        generated = output[:, prompt_len:].tolist()
        records = recorder.finish(output) if recorder is not None else [None] * len(rows)
        choices = [
            self.choice(row, tokens, record, view.cancelled_at(i) if view else None)
            for i, (row, tokens, record) in enumerate(zip(rows, generated, records, strict=True))
        ]
        results: list[GenerationResult | Exception] = []
        offset = 0
        left_grammar = constrained.failed_rows if constrained is not None else {}
        for request in requests:
            mine = choices[offset : offset + request.n]
            own = range(offset, offset + request.n)
            strayed = [left_grammar[r] for r in own if r in left_grammar]
            offset += request.n
            if strayed:
                results.append(ModelError(f"generation left the response format: {strayed[0]}"))
            elif stops.timed_out and any(
                c.finish_reason == "length" and c.completion_tokens < request.max_new_tokens
                for c in mine
            ):
                results.append(
                    GenerationTimeout(
                        f"generation exceeded the job time limit of {timeout_s:g}s "
                        f"(CQ_JOB_TIMEOUT_S) after {max(c.completion_tokens for c in mine)} tokens"
                    )
                )
            else:
                results.append(
                    GenerationResult(choices=mine, prompt_tokens=len(request.prompt_ids))
                )
        return results

    def _grammars(self) -> Grammars:
        """The response formats' compiler for this tokenizer, made on the first use."""
        if self.grammars is None:
            self.grammars = Grammars(
                self.tokenizer, vocab_size=int(self.model.config.vocab_size), stop_ids=self.eos_ids
            )
        return self.grammars

    def _refuse_formats(self, requests: Sequence[GenerationRequest]) -> dict[int, Exception]:
        """Compile each request's response format; return the errors of those that fail."""
        refused: dict[int, Exception] = {}
        for index, request in enumerate(requests):
            if request.response_format is not None:
                try:
                    self._grammars().compile(request.response_format)
                except UnsupportedResponseFormat as exc:
                    refused[index] = exc
        return refused

    def _cache(self, prefix_ids: torch.Tensor, rows: int, width: int) -> Cache | None:
        """The call's KV cache: the shared prefix's, a growing one, or None (generate's own)."""
        if prefix_ids.shape[1]:
            # generate then computes only the tokens after the prefix.
            return prefix_cache(self.model, prefix_ids, rows, width)
        return growing_cache(self.model) if self.growing_kv_cache else None

    def _run_model(self, **kwargs: Any) -> Any:
        """Call the model's ``generate``; the one place generation touches the model."""
        return self.model.generate(**kwargs)

    def _generator(self, seed: int | None, choice: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.manual_seed(secrets.randbits(63))
        else:
            # Each choice of a seeded job gets its own stream, fixed by (seed, choice).
            generator.manual_seed((seed * 1_000_003 + choice) % (2**63))
        return generator

    def choice(
        self,
        row: GenerationRequest,
        tokens: list[int],
        record: RowLogprobs | None = None,
        cancelled_at: int | None = None,
    ) -> GeneratedChoice:
        """Turn a row's generated tokens into a choice: cut at EOS, budget and stops.

        ``record`` is the row's logprobs as recorded in ``generate``; the choice keeps
        one entry per kept token. A row a cancel stopped keeps its first
        ``cancelled_at`` tokens and ends ``cancelled`` (unless it had ended before).
        """
        tokens, text, finish = end_row(
            row,
            tokens,
            ends={*self.eos_ids, self.pad_id},
            decode=partial(self.tokenizer.decode, skip_special_tokens=True),
            cancelled_at=cancelled_at,
        )
        logprobs = stored_logprobs(record, tokens, self.spell) if record is not None else None
        return GeneratedChoice(
            text=text, finish_reason=finish, completion_tokens=len(tokens), logprobs=logprobs
        )

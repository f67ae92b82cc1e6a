"""The vLLM engine: one resident vLLM engine in the worker's model process, stepped in a loop.

Why vLLM: its paged KV cache, continuous batching and prefix caching outrun
Hugging Face ``generate`` (issue 33's figures), yet it has no queue of its own;
here it is one more :class:`~engine.protocol.Engine` behind the worker.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
the worker already gives the model a process of its own, which Celery
supervises, and a dead engine must end that process. Each row (one choice of
one request) is one vLLM request with ``n=1``, so a row can be aborted alone
(a cancel) and a seeded choice gets its own stream, ``(seed, choice)`` as in
the static engine: its text does not depend on its batch-mates.

One resident thread steps vLLM for as long as any row runs (continuous batching):
:meth:`VllmEngine.generate` hands its call's rows to that thread and waits. Calls
from several threads may run at once: a call's rows join the running ones at the
next step, never waiting for another call to end, and each caller is woken when
its own rows end (or its time limit passes, or a step fails it). Only that thread
touches vLLM's engine after loading, since ``LLMEngine`` is not thread-safe. vLLM reports
a row's new tokens to its caller's follower at the first token, then every few tokens
(:func:`output_interval`: about twice per progress interval), and at every step for a
streamed job.

Semantics are ours, not vLLM's defaults: the generated token ids come from
vLLM, and the text, ``finish_reason`` and ``completion_tokens`` are made from
them as :meth:`engine.static.StaticEngine.choice` does (cut at the first EOS,
then at the earliest stop string). vLLM is given the stop strings only so it
stops early. Log probabilities are vLLM's raw ones (before any penalty or
temperature), as the static engine records them.

A ``response_format`` runs through vLLM's structured outputs on its guidance
(llguidance) backend, handed the very grammar the static engine compiles
(:func:`guidance_schema`: fixed separators, no free whitespace), so a job's JSON
has the same language on either engine; the kept tokens are then checked with the
static engine's own matcher, and a row that left its format fails its job, as there.
A job's lane and ``priority`` feed vLLM's priority scheduling (:func:`vllm_priority`):
interactive rows before batch lines, then the more urgent. vLLM runs ``max_rows`` rows at
once and starts its waiting ones most urgent first as rows end; when the KV cache runs
short, it preempts the least urgent rows (batch lines first). It never preempts a row for
want of a seat, so batch lines take at most ``batch_rows`` of them: the others wait here,
in the order they came, and go in as batch rows end, while an interactive row always goes
to vLLM at once and finds a seat free.

vllm is imported only when an engine is built, so this module imports (and its
pure mapping, :func:`sampling_kwargs`, is tested) where vllm is not installed.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import llguidance

from completion_queue import (
    FatalModelError,
    GenerationTimeout,
    ModelError,
    UnsupportedResponseFormat,
    parse_response_format,
)
from engine.grammar import JSON_OPTIONS, Grammars
from engine.logprobs import RowLogprobs, TokenSpeller, stored_logprobs
from engine.protocol import FollowedRows, Follower
from engine.types import GeneratedChoice, GenerationRequest, GenerationResult, end_row

log = logging.getLogger(__name__)

#: Bytes per KV-cache token when the model's config does not say (1 GiB / 16k tokens).
FALLBACK_KV_BYTES_PER_TOKEN = 65_536
#: Tokens in a KV-cache block of vLLM's CPU backend (its GPU blocks hold 16): a row takes
#: at least one.
BLOCK_TOKENS = 128
#: How often a caller waiting for its rows checks that the step thread still runs.
THREAD_CHECK_S = 1.0
#: Longest ``close`` waits for the step thread to finish its step and abort the rows.
CLOSE_WAIT_S = 10.0
#: Most tokens between two reports of a row that no caller streams (see :func:`output_interval`).
MAX_OUTPUT_INTERVAL = 16
#: Weight of the newest step in the running estimate of a step's time.
STEP_EMA = 0.2


def output_interval(progress_s: float, step_s: float | None) -> int:
    """Tokens between two reports of a row's new tokens when no caller streams it.

    vLLM reports a row to the worker at its first token, then every ``stream_interval``
    tokens, then at its end. Each report is a Python object per row per step, about a
    fifth of a step where steps are short (the tiny model, or a GPU), so rows nobody
    streams are reported about twice per progress interval (their rows show partial
    output that often), not at every step; streamed rows (``stream``) at every step.
    ``step_s``: a step's time lately (None: not measured yet, report every step);
    ``progress_s`` 0: partial output is off, so rows are reported at the most rarely.
    """
    if not progress_s:
        return MAX_OUTPUT_INTERVAL
    if not step_s:
        return 1
    return max(1, min(MAX_OUTPUT_INTERVAL, int(progress_s / (2 * step_s))))


def vllm_priority(priority: int, lane: str = "interactive") -> int:
    """Map a job's lane and priority (0 normal .. 9 most urgent) to vLLM's, which runs the
    lowest first: interactive rows before batch lines, then the more urgent."""
    return (0 if lane == "interactive" else 10) - priority


@functools.lru_cache(maxsize=64)
def guidance_schema(response_format: str) -> str | None:
    """The JSON schema to hand vLLM's guidance backend for a stored ``response_format``.

    It is the schema inside the grammar :class:`engine.grammar.Grammars` compiles, with
    our options (fixed separators, no free whitespace) written into its ``x-guidance``:
    the backend, whatever its own whitespace setting, then builds that very grammar.
    None for ``{"type": "text"}``.

    Raises:
        UnsupportedResponseFormat: malformed, or a schema llguidance cannot take.
    """
    try:
        schema = parse_response_format(json.loads(response_format)).grammar_schema
    except ValueError as exc:
        raise UnsupportedResponseFormat(f"response_format {exc}") from exc
    if schema is None:
        return None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise UnsupportedResponseFormat(f"unsupported JSON schema: {exc}") from exc
    (only,) = json.loads(grammar)["grammars"]
    return json.dumps(only["json_schema"])


def row_seed(seed: int | None, choice: int) -> int | None:
    """The seed of one choice of a seeded request: its own stream, as in the static engine."""
    if seed is None:
        return None
    return (seed * 1_000_003 + choice) % (2**63)


def sampling_kwargs(
    request: GenerationRequest, choice: int, *, stop_token_ids: Sequence[int]
) -> dict[str, Any]:
    """Return vLLM ``SamplingParams`` keywords for one choice (row) of ``request``.

    Greedy is temperature 0 (vLLM then ignores top_p and top_k, as we do); top_k 0
    is off in both. Log probabilities are the raw ones and ``logprobs`` counts the
    alternatives besides the chosen token, as ours does. Stop strings and the end
    tokens only end the row early: the text is cut from the token ids afterwards.
    """
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "seed": row_seed(request.seed, choice),
        "stop": list(request.stop),
        "stop_token_ids": list(stop_token_ids),
        # Our end tokens are the tokenizer's and the generation config's; no other.
        "ignore_eos": False,
        "skip_special_tokens": True,
        "logprobs": request.logprobs,
        # vLLM's text is never read (ours is decoded from the token ids once, at the end):
        # it detokenizes a row as it goes only to look for its stop strings.
        "detokenize": bool(request.stop),
    }
    return kwargs


def kv_cache_bytes(
    config: Any, dtype_bytes: int, *, context: int, max_rows: int, kv_rows: int = 0
) -> int:
    """The KV cache an engine of ``max_rows`` rows gets: ``kv_rows`` rows at full context
    (``max_rows`` when 0), and at least one block of :data:`BLOCK_TOKENS` for each of
    ``max_rows`` rows, so that short rows all run at once (a row takes whole blocks: with
    32 rows at the tiny model's 512 tokens of context, 127 rows ran and 385 waited).

    vLLM's own default takes most of the host's memory (and refuses to start when another
    process holds more than a tenth); at least 16 MiB.
    """
    tokens = max((kv_rows or max_rows) * context, max_rows * BLOCK_TOKENS)
    return max(tokens * kv_bytes_per_token(config, dtype_bytes), 16 << 20)


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes one token takes in the KV cache of a model with this Hugging Face ``config``."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return FALLBACK_KV_BYTES_PER_TOKEN
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(2 * layers * kv_heads * head_dim * dtype_bytes)


@dataclass
class _Row:
    """One vLLM request: a choice of one of the call's requests, and what it generated."""

    request: GenerationRequest
    choice: int
    index: int
    #: What the row's response format hands vLLM's guidance backend; None: unconstrained.
    schema: str | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Any]] = field(default_factory=list)
    done: bool = False
    cancelled_at: int | None = None
    #: Handed to vLLM (a batch row may wait here first, see :attr:`VllmEngine.batch_rows`).
    added: bool = False

    @property
    def batch(self) -> bool:
        """A batch line's row (not an interactive call's)."""
        return self.request.lane == "batch"


@dataclass(eq=False)
class _Call:
    """One ``generate`` call's rows, handed to the step thread; its caller waits on ``done``."""

    requests: Sequence[GenerationRequest]
    view: FollowedRows | None
    #: ``time.monotonic()`` past which its unfinished rows are aborted (the job time limit).
    deadline: float
    #: Its rows by vLLM request id, in the call's order (each request's ``n`` rows).
    rows: dict[str, _Row] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    #: What failed the whole call (a step, or vLLM refusing a row); raised to its caller.
    error: BaseException | None = None


class VllmEngine:
    """A vLLM ``LLMEngine`` loaded once, kept resident in this process, stepped by one thread."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_rows: int = 32,
        batch_rows: int = 0,
        kv_rows: int = 0,
        prefix_caching: bool = True,
        threads: int = 0,
        progress_s: float = 0.5,
    ) -> None:
        started = time.perf_counter()
        # The worker's model process is the engine's process: no engine-core child.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from vllm import EngineArgs, LLMEngine
        from vllm.config import StructuredOutputsConfig

        from engine.devices import resolve_dtype, set_model_threads

        self.name = model
        self.device = "cpu" if not torch.cuda.is_available() else "cuda"
        resolved = resolve_dtype(dtype, torch.device(self.device))
        # The in-process engine core binds no OpenMP threads and leaves torch's count as it
        # finds it (VLLM_CPU_OMP_THREADS_BIND applies to its multiprocess executor alone),
        # then forbids changing it: set it first, as the static engine does.
        #: torch's CPU threads, as the step thread (which runs the model) reads them.
        self.threads = set_model_threads(threads, torch.device(self.device))
        self.dtype = str(resolved).removeprefix("torch.")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
        self.grammars: Grammars | None = None
        self.context_length: int = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or self.tokenizer.model_max_length
        )
        try:
            generation_eos = GenerationConfig.from_pretrained(model).eos_token_id
        except OSError:
            generation_eos = None
        listed = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        eos = self.tokenizer.eos_token_id
        #: Every token that ends a row: the tokenizer's EOS, then the generation config's.
        self.eos_ids: list[int] = list(
            dict.fromkeys(([eos] if eos is not None else []) + [int(i) for i in listed])
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (eos if eos is not None else 0)
        self.spell = TokenSpeller(self.tokenizer)
        # Rows beyond what the KV cache holds wait in vLLM's queue.
        kv_bytes = kv_cache_bytes(
            config,
            resolved.itemsize,
            context=self.context_length,
            max_rows=max_rows,
            kv_rows=kv_rows,
        )
        args = EngineArgs(
            model=model,
            dtype=self.dtype,
            max_model_len=self.context_length,
            max_num_seqs=max_rows,
            kv_cache_memory_bytes=kv_bytes,
            enable_prefix_caching=prefix_caching,
            # The engine's global generator draws for unseeded rows: fresh per process.
            seed=secrets.randbits(31),
            disable_log_stats=True,
            # Rows wait in vLLM's queue beyond max_rows: the most urgent job's rows start first.
            scheduling_policy="priority",
            # llguidance, as the static engine: each row is handed the very grammar that
            # engine builds (see guidance_schema); no free whitespace either way.
            structured_outputs_config=StructuredOutputsConfig(
                backend="guidance", disable_any_whitespace=True
            ),
        )
        self.engine: Any = LLMEngine.from_engine_args(args)
        # A fast tokenizer raises "Already borrowed" when two threads encode with it at once.
        self._encode_lock = threading.Lock()
        self._counter = 0
        #: Guards the inbox, the counter and the flags; step thread and callers wait on it.
        self._wake = threading.Condition()
        #: Calls handed in and not yet added to vLLM (the step thread adds them between steps).
        self._inbox: list[_Call] = []
        self._closing = False
        #: Set when the engine died: every later call raises it.
        self._dead: FatalModelError | None = None
        self._thread: threading.Thread | None = None
        # The step thread's own, never touched by callers:
        #: Every row in vLLM now, of every call, by request id (aborted on close).
        self._running: dict[str, _Row] = {}
        #: The call each running row belongs to.
        self._owners: dict[str, _Call] = {}
        #: The calls whose rows are in vLLM, oldest first.
        self._calls: list[_Call] = []
        #: The most batch lines' rows in vLLM at once (0: ``max_rows``); the rest wait here.
        self.batch_rows = batch_rows or max_rows
        #: Batch rows not yet handed to vLLM, oldest first (with their request ids).
        self._waiting: collections.deque[tuple[str, _Row]] = collections.deque()
        #: The request ids of the batch rows in vLLM now.
        self._batch_in: set[str] = set()
        #: How often rows show their partial output (``CQ_PROGRESS_INTERVAL_MS``), in seconds.
        self.progress_s = progress_s
        #: A step's time lately (an exponential average; None before the first step).
        self._step_s: float | None = None
        self.load_s = time.perf_counter() - started
        log.info(
            "loaded model %s in vLLM on %s (%s, %d threads, KV cache %.0f MiB) in %.2fs [pid %d]",
            model,
            self.device,
            self.dtype,
            self.threads,
            kv_bytes / 2**20,
            self.load_s,
            os.getpid(),
        )

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each prompt (callers in several threads take turns)."""
        with self._encode_lock:
            encoded = self.tokenizer(list(prompts), add_special_tokens=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def runs(self, request: GenerationRequest) -> bool:
        """True: this engine honours every field of a request (README's engine table)."""
        return True

    def warm_up(self) -> None:
        """Run one small greedy request, so the first real batch pays no start-up cost."""
        ids = self.encode(["Hello, world"])[0] or [self.pad_id]
        request = GenerationRequest(
            key="warm-up", prompt_ids=tuple(ids), max_new_tokens=2, temperature=0.0
        )
        self.generate([request])

    def close(self) -> None:
        """Stop the step thread and abort whatever is left in the engine (the process ends)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT_S)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        timeout_s: float | None = None,
        watch: Follower | None = None,
    ) -> list[GenerationResult | Exception]:
        """Run ``requests`` to the end in the resident engine; results in the same order.

        Threads may call it at once (the module's docstring says how calls share the
        engine). A request whose ``response_format`` cannot be enforced gets an
        :class:`UnsupportedResponseFormat`; one whose row left its format, a :class:`ModelError`.
        A request still generating ``timeout_s`` seconds after the call began is
        aborted and gets a :class:`GenerationTimeout`; the others keep theirs. ``watch``
        sees every row's tokens after each step and names rows to abort (cancels).

        Raises:
            FatalModelError: the engine died; the process must exit.
            ModelError: a step failed for another reason (every call running then gets it).
        """
        refused = self._refuse_formats(requests)
        kept = [r for i, r in enumerate(requests) if i not in refused]
        done = iter(self._generate(kept, timeout_s, watch) if kept else [])
        return [refused[i] if i in refused else next(done) for i in range(len(requests))]

    def _generate(
        self,
        requests: Sequence[GenerationRequest],
        timeout_s: float | None,
        watch: Follower | None,
    ) -> list[GenerationResult | Exception]:
        """Hand one call's rows to the step thread; wait until they end; make the results."""
        started = time.monotonic()
        deadline = started + timeout_s if timeout_s is not None else math.inf
        view = watch.follow(requests) if watch is not None else None
        call = _Call(requests=requests, view=view, deadline=deadline)
        with self._wake:
            if self._dead is not None:
                raise FatalModelError(str(self._dead)) from self._dead
            if self._closing:
                raise ModelError("the vLLM engine is closing")
            for request in requests:
                schema = (
                    guidance_schema(request.response_format) if request.response_format else None
                )
                for choice in range(request.n):
                    self._counter += 1
                    call.rows[f"cq-{self._counter}"] = _Row(request, choice, len(call.rows), schema)
            self._inbox.append(call)
            self._start_thread()
            self._wake.notify()
        # The step thread ends every call it takes, even when it fails; a thread that died
        # of something else leaves its calls for ever, so the wait checks on it.
        while not call.done.wait(THREAD_CHECK_S):
            thread = self._thread
            if thread is None or not thread.is_alive():
                raise FatalModelError("the vLLM step thread stopped")
        if call.error is not None:
            raise call.error
        return self._results(requests, call.rows, call.timed_out, timeout_s)

    def _start_thread(self) -> None:
        """Start the step thread on the first call (held: ``self._wake``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cq-vllm-steps", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """The step thread: admit new calls, step, hand each row its tokens, end finished calls.

        The only thread that touches vLLM's engine after loading (add, step, abort).
        """
        import torch

        self.threads = torch.get_num_threads()
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self._calls or self._closing):
                        self._wake.wait()
                    if self._closing:
                        break
                    arrived, self._inbox = self._inbox, []
                for call in arrived:
                    self._admit(call)
                try:
                    self._turn()
                except FatalModelError as exc:
                    with self._wake:
                        self._dead = exc
                    self._fail_all(exc)
                except Exception as exc:
                    # ModelError from a step, or anything else: every row running shared it.
                    log.warning("vLLM step failed for %d call(s): %s", len(self._calls), exc)
                    self._fail_all(exc)
        finally:
            with self._wake:
                self._closing = True
                arrived, self._inbox = self._inbox, []
            self._calls.extend(arrived)
            self._fail_all(self._dead or ModelError("the vLLM engine is closing"))

    def _admit(self, call: _Call) -> None:
        """Take a call's rows: interactive ones into vLLM now, batch ones when a seat is theirs
        (:meth:`_fill`); a row vLLM refuses fails the call alone."""
        for request_id, row in call.rows.items():
            self._running[request_id] = row
            self._owners[request_id] = call
        self._calls.append(call)
        try:
            for request_id, row in call.rows.items():
                if row.batch:
                    self._waiting.append((request_id, row))
                else:
                    self._add(request_id, row)
        except Exception as exc:
            self._end(call, exc)

    def _fill(self) -> None:
        """Hand vLLM the waiting batch rows its batch lines have seats for, oldest first."""
        while self._waiting and len(self._batch_in) < self.batch_rows:
            request_id, row = self._waiting.popleft()
            if row.done or request_id not in self._running:
                continue  # a cancel stopped it, or its call ended, while it waited
            try:
                self._add(request_id, row)
            except Exception as exc:
                self._end(self._owners[request_id], exc)

    def _add(self, request_id: str, row: _Row) -> None:
        """Add one row to vLLM's engine."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if row.schema is not None:
            structured = StructuredOutputsParams(json=row.schema)
        every = output_interval(self.progress_s, self._step_s)
        params = SamplingParams(
            **sampling_kwargs(row.request, row.choice, stop_token_ids=self.eos_ids),
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
            stream_interval=1 if row.request.stream else every,
        )
        self.engine.add_request(
            request_id,
            {"prompt_token_ids": list(row.request.prompt_ids)},
            params,
            priority=vllm_priority(row.request.priority, row.request.lane),
        )
        row.added = True
        if row.batch:
            self._batch_in.add(request_id)

    def _turn(self) -> None:
        """End the calls past their deadline, run one step, end the calls whose rows all ended."""
        now = time.monotonic()
        for call in list(self._calls):
            if now >= call.deadline:
                call.timed_out = True
                self._end(call)
        if not self._calls:
            return
        self._fill()
        outputs = self._step()
        reported: set[int] = set()
        for output in outputs:
            row = self._running.get(output.request_id)
            if row is None or row.done:
                continue
            call = self._owners[output.request_id]
            reported.add(id(call))
            completion = output.outputs[0]
            row.tokens.extend(completion.token_ids)
            if completion.logprobs:
                row.logprobs.extend(completion.logprobs)
            if call.view is not None:
                call.view.set(row.index, list(row.tokens))
            if output.finished:
                row.done = True
                self._batch_in.discard(output.request_id)
                if call.view is not None:
                    call.view.finish(row.index)
        for call in list(self._calls):
            if call.view is not None:
                if id(call) not in reported:
                    call.view.tick()
                self._stop_rows(call)
            if all(row.done for row in call.rows.values()):
                self._end(call)

    def _end(self, call: _Call, error: BaseException | None = None) -> None:
        """Abort a call's unfinished rows, forget its rows and wake its caller."""
        unfinished = [
            i for i, row in call.rows.items() if row.added and not row.done and i in self._running
        ]
        for request_id in call.rows:
            self._running.pop(request_id, None)
            self._owners.pop(request_id, None)
            self._batch_in.discard(request_id)
        if call in self._calls:
            self._calls.remove(call)
        call.error = error
        try:
            if unfinished:
                # Free their slots now; nothing waits for these ids any more.
                self.engine.abort_request(unfinished)
        finally:
            call.done.set()

    def _fail_all(self, exc: BaseException) -> None:
        """End every call the thread holds with ``exc``."""
        for call in list(self._calls):
            try:
                self._end(call, exc)
            except Exception:
                log.warning("could not abort the rows of a failed call", exc_info=True)

    def _step(self) -> list[Any]:
        """One engine step: every running row's next token; the one place vLLM runs the model."""
        from vllm.v1.engine.exceptions import EngineDeadError

        started = time.perf_counter()
        try:
            outputs = list(self.engine.step())
        except EngineDeadError as exc:
            raise FatalModelError(f"the vLLM engine died: {exc}") from exc
        except RuntimeError as exc:
            if "CUDA error" in str(exc):
                raise FatalModelError(f"CUDA failure in the vLLM engine: {exc}") from exc
            raise ModelError(f"vLLM step failed: {exc}") from exc
        took = time.perf_counter() - started
        last = self._step_s
        self._step_s = took if last is None else last + STEP_EMA * (took - last)
        return outputs

    def _stop_rows(self, call: _Call) -> None:
        """Abort the rows the call's follower says to stop (their jobs were cancelled)."""
        assert call.view is not None
        order = list(call.rows)
        stopped = []
        for index in call.view.to_stop():
            request_id = order[index]
            row = call.rows[request_id]
            if not row.done:
                row.done = True
                row.cancelled_at = call.view.cancelled_at(index)
                if row.added:
                    stopped.append(request_id)
                    self._batch_in.discard(request_id)
        if stopped:
            self.engine.abort_request(stopped)

    def _results(
        self,
        requests: Sequence[GenerationRequest],
        rows: dict[str, _Row],
        timed_out: bool,
        timeout_s: float | None,
    ) -> list[GenerationResult | Exception]:
        by_request: dict[str, list[_Row]] = {}
        for row in rows.values():
            by_request.setdefault(row.request.key, []).append(row)
        results: list[GenerationResult | Exception] = []
        for request in requests:
            mine = by_request[request.key]
            if timed_out and any(not r.done for r in mine):
                generated = max(len(r.tokens) for r in mine)
                results.append(
                    GenerationTimeout(
                        f"generation exceeded the job time limit of {timeout_s:g}s "
                        f"(CQ_JOB_TIMEOUT_S) after {generated} tokens"
                    )
                )
                continue
            strayed = [error for row in mine if (error := self._left_format(row)) is not None]
            if strayed:
                results.append(ModelError(f"generation left the response format: {strayed[0]}"))
                continue
            choices = [self.choice(row) for row in mine]
            results.append(GenerationResult(choices=choices, prompt_tokens=len(request.prompt_ids)))
        return results

    def _grammars(self) -> Grammars:
        """The response formats' compiler for this tokenizer, made on the first use."""
        if self.grammars is None:
            self.grammars = Grammars(
                self.tokenizer, vocab_size=self.vocab_size, stop_ids=self.eos_ids
            )
        return self.grammars

    def _refuse_formats(self, requests: Sequence[GenerationRequest]) -> dict[int, Exception]:
        """Compile each request's response format; return the errors of those that fail."""
        refused: dict[int, Exception] = {}
        for index, request in enumerate(requests):
            if request.response_format is not None:
                try:
                    self._grammars().compile(request.response_format)
                    guidance_schema(request.response_format)
                except UnsupportedResponseFormat as exc:
                    refused[index] = exc
        return refused

    def _left_format(self, row: _Row) -> str | None:
        """Why the row's kept tokens leave its response format; None when they keep to it.

        vLLM masks with the very grammar the static engine's matcher checks here, so this
        finds nothing unless a mask went wrong; then the job fails, as on the static
        engine, rather than store text outside its format.
        """
        if row.request.response_format is None:
            return None
        compiled = self._grammars().compile(row.request.response_format)
        if compiled is None:
            return None
        matcher = compiled.matcher()
        kept = row.tokens[: row.request.max_new_tokens]
        if row.cancelled_at is not None:
            kept = kept[: row.cancelled_at]
        for token in kept:
            if not matcher.consume_token(token):
                return matcher.get_error() or f"token {token} was rejected"
            if token in self.eos_ids:
                break
        return None

    def choice(self, row: _Row) -> GeneratedChoice:
        """Turn a row's tokens into a choice as the static engine does: EOS, cancel, stops."""
        request = row.request
        tokens, text, finish = end_row(
            request,
            row.tokens,
            ends={*self.eos_ids, self.pad_id},
            decode=partial(self.tokenizer.decode, skip_special_tokens=True),
            cancelled_at=row.cancelled_at,
        )
        logprobs = None
        if request.logprobs is not None:
            logprobs = stored_logprobs(self._record(row, request.logprobs), tokens, self.spell)
        return GeneratedChoice(
            text=text, finish_reason=finish, completion_tokens=len(tokens), logprobs=logprobs
        )

    @staticmethod
    def _record(row: _Row, k: int) -> RowLogprobs:
        """The row's vLLM logprobs as the static engine records them: chosen, then top ``k``."""
        chosen, top_ids, top_values = [], [], []
        for token, step in zip(row.tokens, row.logprobs, strict=False):
            chosen.append(float(step[token].logprob))
            ranked = sorted(
                (item for item in step.items() if item[1].rank is not None and item[1].rank <= k),
                key=lambda item: item[1].rank,
            )
            top_ids.append([token_id for token_id, _ in ranked])
            top_values.append([float(value.logprob) for _, value in ranked])
        return RowLogprobs(k=k, chosen=chosen, top_ids=top_ids, top_values=top_values)

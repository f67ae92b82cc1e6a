"""OpenAI's completion parameters mapped onto our requests, shared by completions and batches.

OpenAI's parameters map onto our :class:`CompletionRequest` (``max_tokens`` →
``max_new_tokens``) and go through the same validation as the Python client.
A parameter we do not support is refused with a 400, never ignored; one sent
with its neutral value (``echo: false``, zero penalties, ``best_of: 1``) asks
for nothing we do not do, so it is accepted. ``stream: true`` (with
``stream_options``) is taken by the routes that answer Server-Sent Events
(``streaming=True``); a batch's lines refuse it.
Prompt truncation (vLLM's ``truncate_prompt_tokens``) is refused here too: a
too-long prompt fails with ``context_length_exceeded``; the native ``POST
/v1/jobs`` takes ``truncate: true``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.errors import APIError
from api.views import ErrorInfo
from completion_queue import JobTimeout, ModelNotAllowed, ValidationError
from db import LANE_INTERACTIVE, Job
from producer import CompletionClient, Limits, validate_request

#: Longest ``user`` (an end-user id) we write to the log.
MAX_USER_CHARS = 256


class CompletionsBody(BaseModel):
    """The ``POST /v1/completions`` parameters we support (OpenAI's names)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Defaults to CQ_MODEL.")
    prompt: str | list[str] = Field(description="One prompt, or a list (one job each).")
    max_tokens: int | None = Field(default=None, description="max_new_tokens of the jobs.")
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(
        default=None, description="Alternatives per generated token (0 to 20) with their logprobs."
    )
    user: str | None = Field(
        default=None, max_length=MAX_USER_CHARS, description="End-user id, written to the API log."
    )
    stream: bool | None = Field(
        default=None, description="Answer Server-Sent Events (text_completion chunks) as it goes."
    )
    stream_options: dict[str, bool] | None = Field(
        default=None, description='{"include_usage": true}: a last chunk holds the usage.'
    )


#: What a route that streams takes besides ``SUPPORTED`` (see :func:`stream_usage`).
STREAM_FIELDS = frozenset({"stream", "stream_options"})
SUPPORTED = frozenset(CompletionsBody.model_fields) - STREAM_FIELDS
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False, None),
    "stream_options": (None,),
    "echo": (False, None),
    "suffix": (None,),
    "best_of": (1, None),
    "presence_penalty": (0, None),
    "frequency_penalty": (0, None),
    "logit_bias": (None, {}),
}
_RENAMED = {"max_tokens": "max_new_tokens"}
_TRUNCATE_HINT = "use POST /v1/jobs with truncate: true to keep a too-long prompt's last tokens"
#: Parameters other servers take (vLLM's ``truncate_prompt_tokens``), and what to use instead.
INSTEAD = {"truncate_prompt_tokens": _TRUNCATE_HINT, "truncate": _TRUNCATE_HINT}


def to_openai_name(field: str | None) -> str | None:
    """Return OpenAI's name of one of our request fields."""
    for theirs, ours in _RENAMED.items():
        if field == ours:
            return theirs
    return field


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, int):
        return isinstance(value, int | float) and not isinstance(value, bool) and value == neutral
    return type(value) is type(neutral) and bool(value == neutral)


def is_neutral(value: Any, choices: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``choices``, values that ask for nothing we do not do."""
    return any(_same(value, choice) for choice in choices)


def refuse_unsupported(
    body: Any, supported: frozenset[str], neutral: Mapping[str, tuple[Any, ...]]
) -> None:
    """Refuse a body that is not an object, or holds a parameter we do not support.

    A parameter in ``neutral`` is accepted when its value asks for nothing we do not do.

    Raises:
        ValidationError: naming the parameter.
    """
    if not isinstance(body, Mapping):
        raise ValidationError("request body must be a JSON object", field="request")
    for name, value in body.items():
        if name in supported:
            continue
        if name in neutral:
            if is_neutral(value, neutral[name]):
                continue
            allowed = " or ".join(json.dumps(v) for v in neutral[name])
            raise ValidationError(f"{name} is not supported (only {allowed})", field=name)
        hint = f" ({INSTEAD[name]})" if name in INSTEAD else ""
        raise ValidationError(f"{name} is not a supported parameter{hint}", field=name)
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise ValidationError(
            f"user must be a string of at most {MAX_USER_CHARS} characters", field="user"
        )


def stream_usage(body: Mapping[str, Any]) -> bool | None:
    """None when ``body`` does not ask to stream; else whether it asks for a usage chunk
    (``stream_options: {"include_usage": true}``).

    Raises:
        ValidationError: ``stream`` is not a boolean, or ``stream_options`` is malformed or
            sent without ``stream: true``.
    """
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ValidationError("stream must be a boolean", field="stream")
    if options is None:
        return False if stream else None
    if not stream:
        raise ValidationError(
            "stream_options is only allowed with stream: true", field="stream_options"
        )
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ValidationError(
            'stream_options must be an object holding only "include_usage"', field="stream_options"
        )
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ValidationError(
            "stream_options.include_usage must be a boolean", field="stream_options.include_usage"
        )
    return usage


def streamed(body: Mapping[str, Any], *, logprobs: bool) -> bool:
    """True when ``body`` asks to stream; a streamed call cannot ask for ``logprobs``.

    Raises:
        ValidationError: as :func:`stream_usage`, or ``logprobs`` with ``stream: true``.
    """
    if stream_usage(body) is None:
        return False
    if logprobs:
        raise ValidationError(
            "logprobs is not supported with stream: true (ask without stream)", field="logprobs"
        )
    return True


def completion_requests(
    body: Any, max_prompts: int, *, streaming: bool = False
) -> list[dict[str, Any]]:
    """Map an OpenAI completions body to our requests: one per prompt.

    ``streaming``: the caller answers ``stream: true`` (the jobs are submitted with
    ``stream``); else only its neutral values are accepted.

    Raises:
        ValidationError: a parameter is unsupported or malformed (``field`` in OpenAI's names).
    """
    refuse_unsupported(body, SUPPORTED | STREAM_FIELDS if streaming else SUPPORTED, NEUTRAL)
    if "prompt" not in body:
        raise ValidationError("prompt is required", field="prompt")
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ValidationError(
            "prompt must be a string or a non-empty list of strings", field="prompt"
        )
    if not all(isinstance(p, str) for p in prompts):
        raise ValidationError(
            "prompt must hold strings (token ids are not supported)", field="prompt"
        )
    if len(prompts) > max_prompts:
        raise ValidationError(f"prompt must hold at most {max_prompts} prompts", field="prompt")
    shared = {
        str(_RENAMED.get(name, name)): value
        for name, value in body.items()
        if name in SUPPORTED and name not in ("prompt", "user") and value is not None
    }
    if streaming and streamed(body, logprobs=body.get("logprobs") is not None):
        shared["stream"] = True
    return [{"prompt": text, **shared} for text in prompts]


def submit_completions(
    client: CompletionClient,
    requests: list[dict[str, Any]],
    *,
    batch_id: str | None = None,
    in_transaction: Callable[[Session, list[Job]], None] | None = None,
    lane: str = LANE_INTERACTIVE,
    deadline: datetime | None = None,
) -> list[Job]:
    """Validate and queue ``requests`` in ``lane`` (interactive: a caller waits for them);
    errors name OpenAI's fields."""
    try:
        return client.submit_many(
            requests,
            batch_id=batch_id,
            in_transaction=in_transaction,
            lane=lane,
            deadline=deadline,
        )
    except ValidationError as exc:
        raise in_openai_names(exc, single=len(requests) == 1) from None


def check_served(client: CompletionClient, requests: list[dict[str, Any]]) -> None:
    """Refuse at once a model that no live worker serves and no configured list names (the
    API's ``CQ_MODEL``, the tenant's ``--models``): its jobs would only wait out the wait.

    Raises:
        ModelNotAllowed: 404 ``model_not_found``, naming the models served now.
    """
    models = {r.get("model") or client.settings.model for r in requests}
    configured = {client.settings.model, *(client.quota.models or () if client.quota else ())}
    unknown = {model for model in models if isinstance(model, str)} - configured
    if not unknown:
        return
    served = client.served_models()
    missing = sorted(unknown - set(served))
    if missing:
        raise not_served(missing[0], served)


def not_served(model: str, served: Iterable[str]) -> ModelNotAllowed:
    """The 404 ``model_not_found`` for a model no live worker serves, naming those served."""
    return ModelNotAllowed(
        f"the model {model!r} does not exist or no worker serves it; "
        f"served now: {', '.join(sorted(served)) or 'none'}"
    )


def in_openai_names(exc: ValidationError, *, single: bool = True) -> ValidationError:
    """Return ``exc`` with its message and field in OpenAI's parameter names."""
    message = str(exc)
    for theirs, ours in _RENAMED.items():
        message = message.replace(ours, theirs)
    if single and message.startswith("requests[0]: "):
        message = message.removeprefix("requests[0]: ")
    return ValidationError(message, field=to_openai_name(exc.field))


def check_requests(requests: list[dict[str, Any]], limits: Limits) -> None:
    """Validate ``requests`` as the client will; errors name OpenAI's fields."""
    for request in requests:
        try:
            validate_request(request, limits)
        except ValidationError as exc:
            raise in_openai_names(exc) from None


async def finished_completion(
    client: CompletionClient, jobs: list[Job], timeout_s: float, request: Request | None = None
) -> list[Job]:
    """Wait for ``jobs`` (holding no thread); past ``timeout_s`` they are cancelled: a 503.

    A client that goes away first (its timeout; the openai clients then retry) cancels
    the jobs too, as a streamed call's does, so no retried call runs its jobs twice.
    """
    done: list[Job] | None = None
    failed: Exception | None = None
    async with anyio.create_task_group() as group:
        if request is not None:
            group.start_soon(_cancel_on_disconnect, request, group.cancel_scope)
        try:
            done = await client.wait_async(jobs, timeout=timeout_s)
        except Exception as exc:  # raised below, outside the task group (no ExceptionGroup)
            failed = exc
        group.cancel_scope.cancel()
    if done is not None:
        return done
    if failed is not None and not isinstance(failed, JobTimeout):
        raise failed
    for job in jobs:
        await run_in_threadpool(client.cancel, job.id)
    if failed is None:
        # The client went away: nobody reads this answer.
        raise APIError(ErrorInfo(499, "the client closed the request", code="client_closed"))
    raise APIError(
        ErrorInfo(
            503,
            f"the completion did not finish within {timeout_s:g}s (is a worker serving "
            f"model {jobs[0].model!r}?); its jobs were cancelled",
            "server_error",
            code="timeout",
        ),
        headers={"Retry-After": "1"},
    )


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(0.25)
    scope.cancel()

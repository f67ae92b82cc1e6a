"""The completion request: validated before anything is written or queued."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from completion_queue import Settings, ValidationError, parse_response_format
from producer.callbacks import (
    InvalidCallback,
    NonPublicAddress,
    callback_host,
    parse_callback,
    refuse_literal,
)
from producer.chat import MAX_MESSAGES, Message, conversation_chars
from producer.scheduling import check_lane, parse_deadline

MAX_STOP_SEQUENCES = 4
#: Longest stop string: a stop is matched against the decoded tail at every step.
MAX_STOP_CHARS = 256
#: Largest top_k (a token id is a 64-bit integer in the worker; any vocabulary is smaller).
MAX_TOP_K = 1_000_000
MAX_URL_CHARS = 2048
#: Most alternatives per token that ``logprobs`` may ask for (OpenAI's ``top_logprobs`` bound).
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a deployment sets on requests (from settings)."""

    max_prompt_chars: int = 32_000
    max_new_tokens: int = 1024
    max_n: int = 8
    allow_private_callbacks: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Return the limits configured in ``settings``."""
        return cls(
            max_prompt_chars=settings.max_prompt_chars,
            max_new_tokens=settings.max_new_tokens_limit,
            max_n=settings.max_n,
            allow_private_callbacks=settings.webhook_allow_private,
        )


class CompletionRequest(BaseModel):
    """One completion job as submitted: a prompt or chat messages. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = Field(default=None, strict=True)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    model: str | None = Field(default=None, strict=True, min_length=1, max_length=255)
    max_new_tokens: int = Field(default=16, strict=True, ge=1)
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, strict=True, ge=0, le=MAX_TOP_K)
    repetition_penalty: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    n: int = Field(default=1, strict=True, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, strict=True, ge=0, lt=2**63)
    idempotency_key: str | None = Field(default=None, strict=True, min_length=1, max_length=255)
    priority: int = Field(default=0, strict=True, ge=0, le=9)
    callback_url: str | None = Field(default=None, strict=True, max_length=MAX_URL_CHARS)
    truncate: bool = Field(default=False, strict=True)
    #: Alternatives to record per generated token besides the chosen one; None: no logprobs.
    logprobs: int | None = Field(default=None, strict=True, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    #: Publish each decoding step's text to the job's event stream (``cq.events.<id>``).
    stream: bool = Field(default=False, strict=True)
    #: ``interactive`` or ``batch``; None: the submit call's own (interactive, but batch
    #: for batch lines and ``cq submit --file``).
    lane: str | None = Field(
        default=None, description="interactive (the default) or batch: interactive goes first."
    )
    #: When the job must have started by, else it fails with ``DeadlineExceeded``.
    deadline: datetime | None = Field(
        default=None,
        description="An ISO-8601 time with a zone, or seconds from now (at most 30 days): a "
        "job not started by then fails with deadline_exceeded.",
    )

    @field_validator("lane", mode="before")
    @classmethod
    def _check_lane(cls, value: Any) -> Any:
        return None if value is None else check_lane(value)

    @field_validator("deadline", mode="before")
    @classmethod
    def _check_deadline(cls, value: Any) -> Any:
        return None if value is None else parse_deadline(value)

    @field_validator("response_format", mode="before")
    @classmethod
    def _check_response_format(cls, value: Any) -> Any:
        if value is None:
            return None
        response_format = parse_response_format(value)
        response_format.check_schema()
        return response_format.stored()

    @field_validator("prompt", mode="before")
    @classmethod
    def _decode_prompt(cls, value: Any) -> Any:
        if isinstance(value, bytes | bytearray):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError("must be valid UTF-8") from exc
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("must not be empty or whitespace only")
        _check_text(value)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item:
                raise ValueError("must not contain empty strings")
            if len(item) > MAX_STOP_CHARS:
                raise ValueError(
                    f"must hold strings of at most {MAX_STOP_CHARS} characters, got {len(item)}"
                )
            _check_text(item)
        return value

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            parse_callback(value)
        except InvalidCallback as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("temperature", "top_p", "repetition_penalty", mode="before")
    @classmethod
    def _no_bool_or_str(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {type(value).__name__}")
        return value

    def params(self) -> dict[str, Any]:
        """Return the generation parameters stored in ``jobs.params``.

        ``truncate``, ``logprobs``, ``response_format`` and ``stream`` are stored only when
        set, so a job stored before they existed still equals its idempotent resubmit.
        """
        params = self.model_dump(
            include={
                "max_new_tokens",
                "temperature",
                "top_p",
                "top_k",
                "repetition_penalty",
                "n",
                "stop",
                "seed",
            }
        )
        if self.truncate:
            params["truncate"] = True
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
        if self.response_format is not None:
            params["response_format"] = self.response_format
        if self.stream:
            params["stream"] = True
        return params

    def stored_messages(self) -> list[dict[str, str]] | None:
        """Return the messages as kept in ``jobs.messages`` (None for a prompt job)."""
        return None if self.messages is None else [m.stored() for m in self.messages]


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 (it holds a lone surrogate)") from exc


_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "list_type": "a list of strings",
    "finite_number": "a finite number",
    "bool_type": "a boolean",
}


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "request"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: Any) -> str:
    field = _field_name(tuple(error["loc"]))
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"{field} must be {op} {bound}, got {_short(value)}"
    if kind in _TYPES:
        return f"{field} must be {_TYPES[kind]}, got {type(value).__name__} {_short(value)}"
    if kind == "extra_forbidden":
        return f"{field} is not a known parameter"
    if kind == "missing":
        return f"{field} is required"
    if kind in ("too_long", "string_too_long"):
        unit = "items" if kind == "too_long" else "characters"
        return f"{field} must have at most {ctx.get('max_length')} {unit}"
    if kind in ("too_short", "string_too_short"):
        unit = "items" if kind == "too_short" else "characters"
        return f"{field} must have at least {ctx.get('min_length')} {unit}"
    if kind == "value_error":
        return f"{field} {ctx.get('error', error['msg'])!s}"
    return f"{field}: {error['msg']}"


def describe_errors(errors: Sequence[Any]) -> tuple[str, str]:
    """Return pydantic ``errors`` as one message naming each field, and the first field."""
    message = "; ".join(_describe(e) for e in errors)
    return message, _field_name(tuple(errors[0]["loc"]))


def validate_request(
    data: Mapping[str, Any] | CompletionRequest, limits: Limits
) -> CompletionRequest:
    """Return ``data`` as a valid request, or raise :class:`ValidationError` naming the field."""
    if isinstance(data, CompletionRequest):
        request = data
    else:
        if not isinstance(data, Mapping):
            raise ValidationError(
                f"request must be an object of parameters, got {type(data).__name__}",
                field="request",
            )
        try:
            request = CompletionRequest.model_validate(dict(data))
        except pydantic.ValidationError as exc:
            message, field = describe_errors(exc.errors())
            raise ValidationError(message, field=field) from None
    if request.prompt is None and request.messages is None:
        raise ValidationError("prompt is required (or messages, for a chat)", field="prompt")
    if request.prompt is not None and request.messages is not None:
        raise ValidationError("give prompt or messages, not both", field="messages")
    if request.messages is not None and not any(m.content.strip() for m in request.messages):
        raise ValidationError("messages must hold some text", field="messages")
    text_field, chars = (
        ("prompt", len(request.prompt))
        if request.prompt is not None
        else ("messages", conversation_chars(request.messages or []))
    )
    checks = (
        (text_field, chars, limits.max_prompt_chars, "characters long"),
        ("max_new_tokens", request.max_new_tokens, limits.max_new_tokens, ""),
        ("n", request.n, limits.max_n, ""),
    )
    for field, value, bound, unit in checks:
        if value > bound:
            what = f"at most {bound} {unit}".rstrip() if unit else f"<= {bound}"
            raise ValidationError(f"{field} must be {what}, got {value}", field=field)
    if request.callback_url and not limits.allow_private_callbacks:
        try:
            refuse_literal(callback_host(parse_callback(request.callback_url)))
        except NonPublicAddress as exc:
            raise ValidationError(
                f"callback_url must reach a public address: {exc} "
                "(CQ_WEBHOOK_ALLOW_PRIVATE=true allows callbacks inside your network)",
                field="callback_url",
            ) from None
    return request

"""OpenAI's Responses API mapped onto a chat job, shared by the routes and batches.

A response is one chat job (the worker renders it with the model's chat template,
as a chat completion's) and one ``responses`` row of what the job does not hold:
the instructions, the input items as given, the previous response, metadata and
the text format. The job's messages are the instructions (a system message), then
the conversation of the previous response (its input and output, never its
instructions), then this input. OpenAI's names map onto ours
(``max_output_tokens`` → ``max_new_tokens``, ``text.format`` → ``response_format``)
and the request goes through the same validation as the Python client's, errors
naming OpenAI's parameters. What we cannot do (tools, reasoning, images, files,
``store: false``, ...) is refused with a 400 naming the parameter; a parameter sent
with its neutral value is accepted.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.chat import check_metadata
from api.openai import STREAM_FIELDS, is_neutral, refuse_unsupported, stream_usage
from completion_queue import ValidationError, parse_response_format
from db import Job, JobStatus, StoredResponse
from producer import Limits, validate_request

RESPONSE_PREFIX = "resp_"
#: The roles of input messages, as we render them (``developer`` is OpenAI's newer ``system``).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ITEM_FIELDS = frozenset({"type", "role", "content", "id", "status"})
#: Fields of an output text part a client sends back as it got it: dropped when neutral.
_NEUTRAL_PART_FIELDS: dict[str, tuple[Any, ...]] = {
    "annotations": (None, []),
    "logprobs": (None, []),
}
_SCHEMA_FIELDS = ("name", "schema", "strict", "description")
#: Our request fields and the OpenAI parameters they come from, for error messages.
_THEIR_NAMES = {"max_new_tokens": "max_output_tokens", "response_format": "text.format"}


class ResponsesBody(BaseModel):
    """The ``POST /v1/responses`` parameters we support (OpenAI's names)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Defaults to CQ_MODEL.")
    input: str | list[dict[str, Any]] = Field(
        description="A user message, or message items (system, developer, user, assistant) of "
        "text: a string or input_text / output_text parts."
    )
    instructions: str | None = Field(
        default=None, description="A system message first; not carried to a continuation."
    )
    max_output_tokens: int | None = Field(default=None, description="max_new_tokens of the job.")
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = Field(
        default=None, description="format: text, json_object or json_schema (constrained)."
    )
    metadata: dict[str, str] | None = Field(default=None, description="At most 16 pairs.")
    store: bool | None = Field(default=None, description="Only true: every response is stored.")
    previous_response_id: str | None = Field(
        default=None, description="Continue after one of your responses: its input and output."
    )
    background: bool | None = Field(
        default=None, description="Answer at once (status queued); retrieve it later."
    )
    stream: bool | None = Field(default=None, description="Answer typed Server-Sent Events.")
    user: str | None = Field(default=None, description="End-user id, written to the API log.")
    callback_url: str | None = Field(
        default=None, description="Ours: POST the finished job there (see webhooks)."
    )


SUPPORTED = frozenset(ResponsesBody.model_fields) - STREAM_FIELDS
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False, None),
    "stream_options": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None,),
    "max_tool_calls": (None,),
    "reasoning": (None,),
    "include": (None, []),
    "conversation": (None,),
    "prompt": (None,),
    "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
    "top_logprobs": (None,),
    "prompt_cache_key": (None,),
    "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,),
    "safety_identifier": (None,),
    "background_options": (None,),
    "context_management": (None,),
    "access_programs": (None,),
    "image": (None,),
    "moderation": (None,),
}


@dataclass(frozen=True)
class ResponseCall:
    """One ``POST /v1/responses`` body: the job's request, and what its response row keeps."""

    request: dict[str, Any]
    instructions: str | None
    #: The input items as given (``{"role", "content"}``, content as text).
    input: list[dict[str, Any]]
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    background: bool = False
    stream: bool = False
    user: str | None = None
    #: The previous response's conversation, put between the instructions and the input.
    history: list[dict[str, str]] = field(default_factory=list)

    def continued(self, history: list[dict[str, str]], limits: Limits) -> ResponseCall:
        """This call after ``history`` (the previous response's input and output).

        Raises:
            ValidationError: the whole conversation is too long (naming ``input``).
        """
        call = dataclasses.replace(self, history=history)
        messages = job_messages(call.instructions, history, call.input)
        request = {**self.request, "messages": messages}
        checked(request, limits)
        return dataclasses.replace(call, request=request)

    def stored(self, job_id: uuid.UUID) -> StoredResponse:
        """The response row of this call's job."""
        return StoredResponse(
            id=job_id,
            instructions=self.instructions,
            input=self.input,
            previous_response_id=self.previous_response_id,
            metadata=self.metadata,
            text=self.text,
            background=self.background,
        )


def response_id(job_id: uuid.UUID) -> str:
    """Return the response id of a job: ``resp_`` and the job id's hex (``cq get`` takes it)."""
    return f"{RESPONSE_PREFIX}{job_id.hex}"


def job_id_of(value: str) -> uuid.UUID | None:
    """Return the job id a response id names, or None when it is not one of ours."""
    if not value.startswith(RESPONSE_PREFIX):
        return None
    try:
        return uuid.UUID(hex=value.removeprefix(RESPONSE_PREFIX))
    except ValueError:
        return None


def response_call(
    body: Any, limits: Limits, *, streaming: bool = False, in_batch: bool = False
) -> ResponseCall:
    """Map a ``POST /v1/responses`` body to our chat request and its response row.

    ``streaming``: the caller answers ``stream: true``; ``in_batch``: a batch line,
    which cannot continue a response nor run in the background. The previous
    response's conversation is added by :meth:`ResponseCall.continued`.

    Raises:
        ValidationError: a parameter is unsupported or malformed (OpenAI's names).
    """
    refuse_unsupported(body, SUPPORTED | STREAM_FIELDS if streaming else SUPPORTED, NEUTRAL)
    if body.get("store") not in (None, True):
        raise ValidationError(
            "store: false is not supported: every response is kept as a job "
            "(DELETE /v1/responses/{id} removes it)",
            field="store",
        )
    check_metadata(body.get("metadata"))
    flags = {name: body.get(name) for name in ("background", "stream")}
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise ValidationError(f"{name} must be a boolean", field=name)
    stream = stream_usage(body) is not None
    if flags["background"] and stream:
        raise ValidationError(
            "stream with background: true is not supported: retrieve the response, "
            "or follow GET /v1/jobs/{id}/events",
            field="stream",
        )
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or job_id_of(previous) is None):
        raise ValidationError(
            f"previous_response_id must be a response id (resp_...), got {previous!r}",
            field="previous_response_id",
        )
    if in_batch:
        for name in ("previous_response_id", "background"):
            if body.get(name):
                raise ValidationError(f"{name} is not supported in a batch line", field=name)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ValidationError(
            "instructions must be a string (input items go in input)", field="instructions"
        )
    items = input_items(body.get("input"))
    request: dict[str, Any] = {"messages": job_messages(instructions, [], items)}
    for ours, theirs in (
        ("model", "model"),
        ("max_new_tokens", "max_output_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("callback_url", "callback_url"),
    ):
        if body.get(theirs) is not None:
            request[ours] = body[theirs]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        request["response_format"] = response_format
    if stream:
        request["stream"] = True
    checked(request, limits)
    return ResponseCall(
        request=request,
        instructions=instructions,
        input=items,
        previous_response_id=previous,
        metadata=body.get("metadata"),
        text=body.get("text"),
        background=bool(flags["background"]),
        stream=stream,
        user=body.get("user"),
    )


def checked(request: dict[str, Any], limits: Limits) -> None:
    """Validate ``request`` as the client will; errors name OpenAI's parameters.

    Raises:
        ValidationError: naming ``input``, ``max_output_tokens``, ``text.format``, ...
    """
    try:
        validate_request(request, limits)
    except ValidationError as exc:
        name = (exc.field or "").split(".")[0].split("[")[0]
        theirs = "input" if name == "messages" else _THEIR_NAMES.get(name, exc.field)
        message = str(exc)
        for ours, their_name in (*_THEIR_NAMES.items(), ("messages", "input")):
            message = message.replace(ours, their_name)
        raise ValidationError(message, field=theirs) from None


def input_items(value: Any) -> list[dict[str, Any]]:
    """Return ``input`` as message items ``{"role", "content"}`` with text content.

    Raises:
        ValidationError: an item or a content part we cannot take, naming it.
    """
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValidationError(
            "input must be a string or a non-empty list of message items", field="input"
        )
    items = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{where} must be a message item object", field=where)
        kind = item.get("type", "message")
        if kind != "message":
            raise ValidationError(
                f"{where}.type must be message, got {kind!r} (function calls, reasoning and "
                "item references are not supported)",
                field=f"{where}.type",
            )
        extra = sorted(set(item) - _ITEM_FIELDS)
        if extra:
            raise ValidationError(
                f"{where}.{extra[0]} is not a supported parameter", field=f"{where}.{extra[0]}"
            )
        role = item.get("role")
        if role not in ROLES:
            raise ValidationError(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                field=f"{where}.role",
            )
        items.append({"role": role, "content": _text_of(item.get("content"), where)})
    return items


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ValidationError(
            f"{where}.content must be a string or a non-empty list of text parts",
            field=f"{where}.content",
        )
    texts = []
    for number, part in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise ValidationError(
                f"{at} must be an input_text or output_text part with text, got type {kind!r} "
                "(images, files and audio are not supported)",
                field=at,
            )
        extra = sorted(
            name
            for name, value in part.items()
            if name not in ("type", "text")
            and not is_neutral(value, _NEUTRAL_PART_FIELDS.get(name, ()))
        )
        if extra:
            raise ValidationError(f"{at}.{extra[0]} is not supported", field=f"{at}.{extra[0]}")
        texts.append(part["text"])
    return "\n".join(texts)


def job_messages(
    instructions: str | None, history: list[dict[str, str]], items: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """The job's messages: the instructions, the previous conversation, then the input."""
    first = [] if instructions is None else [{"role": "system", "content": instructions}]
    given = [{"role": ROLES[item["role"]], "content": item["content"]} for item in items]
    return [*first, *history, *given]


def conversation(job: Job, stored: StoredResponse) -> list[dict[str, str]]:
    """The conversation a response continued from ``job`` starts with: its messages without
    its instructions, then its output as an assistant message.

    Raises:
        ValidationError: the response has not completed (naming ``previous_response_id``).
    """
    if job.status is not JobStatus.SUCCEEDED:
        raise ValidationError(
            f"previous_response_id: response {response_id(job.id)} is {job.status.value}, "
            "not completed: only a completed response can be continued",
            field="previous_response_id",
        )
    messages = list(job.messages or [])
    if stored.instructions is not None:
        messages = messages[1:]
    return [*messages, {"role": "assistant", "content": job.choices[0].text}]


def _response_format(text: Any) -> dict[str, Any] | None:
    """Return ``text``'s format as our ``response_format`` (None for plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ValidationError("text must be an object holding format", field="text")
    for name, value in text.items():
        if name == "verbosity" and value not in (None, "medium"):
            raise ValidationError(
                'text.verbosity is not supported (only "medium")', field="text.verbosity"
            )
        if name not in ("format", "verbosity"):
            raise ValidationError(f"text.{name} is not supported", field=f"text.{name}")
    shape = text.get("format")
    if shape is None:
        return None
    if not isinstance(shape, dict):
        raise ValidationError("text.format must be an object with type", field="text.format")
    kind = shape.get("type")
    if kind == "json_schema":
        extra = sorted(set(shape) - {"type", *_SCHEMA_FIELDS})
        if extra:
            raise ValidationError(
                f"text.format.{extra[0]} is not supported", field=f"text.format.{extra[0]}"
            )
        schema = {name: shape[name] for name in _SCHEMA_FIELDS if name in shape}
        response_format: dict[str, Any] = {"type": kind, "json_schema": schema}
    elif kind in ("text", "json_object"):
        response_format = dict(shape)
    else:
        raise ValidationError(
            f"text.format.type must be text, json_object or json_schema, got {kind!r}",
            field="text.format.type",
        )
    try:
        parse_response_format(response_format).check_schema()
    except ValueError as exc:
        raise ValidationError(f"text.format: {exc}", field="text.format") from None
    return None if kind == "text" else response_format

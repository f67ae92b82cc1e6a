"""OpenAI's chat completion parameters mapped onto our requests, shared by the route and batches.

A chat completion is one job whose prompt is a list of messages (rendered by the
worker with the model's chat template), with ``n`` choices. OpenAI's names map
onto ours (``max_tokens`` and ``max_completion_tokens`` → ``max_new_tokens``,
``logprobs: true`` with ``top_logprobs: k`` → ``logprobs: k``), and the request
then goes through the same validation as the Python client's. As on
``/v1/completions``, a parameter we do not support (tools, audio, images, …)
is refused with a 400 naming it; one sent with its neutral value is accepted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.openai import STREAM_FIELDS, is_neutral, refuse_unsupported, streamed
from completion_queue import ValidationError, models_without_chat
from producer import MAX_LOGPROBS, CompletionClient
from producer.stats import broker_client

#: The roles we render; OpenAI's ``developer`` is its newer name for ``system``.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Most metadata pairs, and their key and value lengths (OpenAI's bounds).
MAX_METADATA, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512


class ChatBody(BaseModel):
    """The ``POST /v1/chat/completions`` parameters we support (OpenAI's names)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Defaults to CQ_MODEL.")
    messages: list[dict[str, Any]] = Field(
        description="system, developer, user and assistant messages; content text or text parts."
    )
    max_tokens: int | None = Field(default=None, description="max_new_tokens of the job.")
    max_completion_tokens: int | None = Field(default=None, description="The same as max_tokens.")
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | None = Field(default=None, description="Log probabilities of each token.")
    top_logprobs: int | None = Field(default=None, description="Alternatives per token, 0 to 20.")
    response_format: dict[str, Any] | None = Field(
        default=None, description="text, json_object, or json_schema (constrained generation)."
    )
    user: str | None = Field(default=None, description="End-user id, written to the API log.")
    metadata: dict[str, str] | None = Field(
        default=None, description="At most 16 pairs, written to the API log."
    )
    stream: bool | None = Field(
        default=None, description="Answer Server-Sent Events (chat.completion.chunk) as it goes."
    )
    stream_options: dict[str, bool] | None = Field(
        default=None, description='{"include_usage": true}: a last chunk holds the usage.'
    )


SUPPORTED = frozenset(ChatBody.model_fields) - STREAM_FIELDS
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False, None),
    "stream_options": (None,),
    "presence_penalty": (0, None),
    "frequency_penalty": (0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "store": (False, None),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
_SHARED = ("temperature", "top_p", "n", "stop", "seed", "response_format")
#: Message fields an OpenAI response's assistant message carries (and clients echo back,
#: e.g. ``messages.append(completion.choices[0].message)``): dropped when they ask for nothing.
_NEUTRAL_MESSAGE_FIELDS: dict[str, tuple[Any, ...]] = {
    "refusal": (None,),
    "annotations": (None, []),
    "audio": (None,),
    "function_call": (None,),
    "tool_calls": (None, []),
}


def chat_request(body: Any, *, streaming: bool = False) -> dict[str, Any]:
    """Map an OpenAI chat completions body to our request (one job).

    ``streaming``: the caller answers ``stream: true`` (the job is submitted with
    ``stream``); else only its neutral values are accepted.

    Raises:
        ValidationError: a parameter is unsupported or malformed (``field`` in OpenAI's names).
    """
    refuse_unsupported(body, SUPPORTED | STREAM_FIELDS if streaming else SUPPORTED, NEUTRAL)
    check_metadata(body.get("metadata"))
    request: dict[str, Any] = {"messages": chat_messages(body.get("messages"))}
    if body.get("model") is not None:
        request["model"] = body["model"]
    budgets = {
        name: body[name]
        for name in ("max_tokens", "max_completion_tokens")
        if body.get(name) is not None
    }
    if len(set(map(repr, budgets.values()))) > 1:
        raise ValidationError(
            "max_tokens and max_completion_tokens differ; give one of them",
            field="max_completion_tokens",
        )
    if budgets:
        request["max_new_tokens"] = next(iter(budgets.values()))
    for name in _SHARED:
        if body.get(name) is not None:
            request[name] = body[name]
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ValidationError("logprobs must be a boolean", field="logprobs")
    if top is not None and not logprobs:
        raise ValidationError("top_logprobs needs logprobs: true", field="top_logprobs")
    if top is not None and (
        not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS
    ):
        raise ValidationError(
            f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {top!r}",
            field="top_logprobs",
        )
    if logprobs:
        request["logprobs"] = 0 if top is None else top
    if streaming and streamed(body, logprobs=bool(logprobs)):
        request["stream"] = True
    return request


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Return OpenAI's ``messages`` as ours: roles we render, text content only.

    Raises:
        ValidationError: a role or a content part we cannot render, naming the message.
    """
    if not isinstance(messages, list) or not messages:
        raise ValidationError("messages must be a non-empty list of messages", field="messages")
    ours = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValidationError(f"{field} must be an object with role and content", field=field)
        role = message.get("role")
        if role not in _ROLES:
            roles = ", ".join(_ROLES)
            raise ValidationError(
                f"{field}.role must be one of {roles}, got {role!r} (tools are not supported)",
                field=f"{field}.role",
            )
        content = message.get("content")
        if isinstance(content, list):
            for number, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValidationError(
                        f"{field}.content[{number}].type must be text, got {kind!r} "
                        "(images, audio and files are not supported)",
                        field=f"{field}.content",
                    )
        message = {
            key: value
            for key, value in message.items()
            if not is_neutral(value, _NEUTRAL_MESSAGE_FIELDS.get(key, ()))
        }
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise ValidationError(
                f"{field}.{extra[0]} is not a supported parameter", field=f"{field}.{extra[0]}"
            )
        ours.append({**message, "role": _ROLES[role]})
    return ours


def check_metadata(metadata: Any) -> None:
    """Refuse ``metadata`` beyond OpenAI's bounds: 16 pairs, keys of 64, values of 512."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise ValidationError(
            f"metadata must be an object of at most {MAX_METADATA} pairs", field="metadata"
        )
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_KEY_CHARS or len(value) > MAX_VALUE_CHARS:
            raise ValidationError(
                f"metadata keys must have at most {MAX_KEY_CHARS} characters and values be "
                f"strings of at most {MAX_VALUE_CHARS} ({key[:64]!r})",
                field="metadata",
            )


def check_chat_template(client: CompletionClient, request: dict[str, Any]) -> None:
    """Refuse messages at once for a model whose every live worker has no chat template.

    Where no live worker says (none is up yet), the job queues, and fails with
    ``NoChatTemplate`` if its model turns out to have none.

    Raises:
        ValidationError: 400 naming ``messages`` and the model.
    """
    model = request.get("model") or client.settings.model
    with broker_client(client.app) as broker:
        without = models_without_chat(broker)
    if model in without:
        raise ValidationError(
            f"model {model!r} has no chat template, so it cannot take messages: "
            "send a prompt to /v1/completions instead",
            field="messages",
        )

"""Chat messages and response formats: the parts of a request that OpenAI's chat API adds.

A job is a prompt or a list of messages; the worker renders messages with the
model's own chat template. Content given as a list of ``{"type": "text"}``
parts is joined with newlines (as vLLM does) and stored as one string, so any
template renders it. A ``response_format`` is checked here as far as can be
without the model: its shape, and that a JSON schema is itself a valid schema
(``jsonschema``'s meta-schema check), and that the grammar library the workers
use (llguidance, see ``engine/grammar.py``) implements every keyword it uses.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
import llguidance
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Most messages in one conversation.
MAX_MESSAGES = 256
#: Longest JSON schema, as canonical JSON.
MAX_SCHEMA_CHARS = 32_000
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TextPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text"]
    text: str = Field(strict=True)


class Message(BaseModel):
    """One chat message: a role and its text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(strict=True)
    name: str | None = Field(default=None, strict=True, min_length=1, max_length=64)

    @field_validator("content", mode="before")
    @classmethod
    def _join_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            parts = [TextPart.model_validate(part) for part in value]
            return "\n".join(part.text for part in parts)
        return value

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str) -> str:
        # As a prompt's: the worker's tokenizer cannot take a lone surrogate (the whole
        # batch would fail), and PostgreSQL's JSON cannot store a NUL.
        if "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid UTF-8 (it holds a lone surrogate)") from None
        return value

    def stored(self) -> dict[str, str]:
        """Return the form kept in ``jobs.messages`` and given to the chat template."""
        return self.model_dump(exclude_none=True)


def check_response_format(value: Any) -> dict[str, Any] | None:
    """Return ``value`` as a normalised response format (None for plain text).

    Raises:
        ValueError: the shape is wrong, or the JSON schema is not a valid schema.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        _only(value, {"type"})
        return None
    if kind == "json_object":
        _only(value, {"type"})
        return {"type": "json_object"}
    if kind != "json_schema":
        raise ValueError(f"type must be text, json_object or json_schema, got {kind!r}")
    _only(value, {"type", "json_schema"})
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("json_schema must be an object with name and schema")
    _only(spec, {"name", "description", "schema", "strict"}, where="json_schema")
    name, schema, strict = spec.get("name"), spec.get("schema", {}), spec.get("strict")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise ValueError("json_schema.name must be 1 to 64 letters, digits, _ or -")
    if not isinstance(schema, dict):
        raise ValueError("json_schema.schema must be a JSON Schema object")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError("json_schema.strict must be a boolean")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise ValueError(f"json_schema.schema must be at most {MAX_SCHEMA_CHARS} characters")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(
            f"json_schema.schema is not a valid JSON Schema: {exc.message}"
            + (f" (at {where})" if where else "")
        ) from None
    _check_supported(schema)
    normalised: dict[str, Any] = {"name": name, "schema": schema}
    if strict is not None:
        normalised["strict"] = strict
    return {"type": "json_schema", "json_schema": normalised}


def _check_supported(schema: dict[str, Any]) -> None:
    """Refuse a schema that constrained generation cannot enforce (the worker would fail it)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        error = llguidance.LLMatcher.validate_grammar(grammar, None)
    except ValueError as exc:
        error = str(exc)
    if error:
        raise ValueError(f"json_schema.schema cannot be enforced: {error}")


def _only(value: dict[str, Any], allowed: set[str], *, where: str = "") -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise ValueError(f"{prefix}{extra[0]} is not a known parameter")


def conversation_chars(messages: list[Message]) -> int:
    """Characters of text in ``messages`` (bounded like a prompt's)."""
    return sum(len(m.content) for m in messages)

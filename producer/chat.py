"""Chat messages: the part of a request that OpenAI's chat API adds.

A job is a prompt or a list of messages; the worker renders messages with the
model's own chat template. Content given as a list of ``{"type": "text"}``
parts is joined with newlines (as vLLM does) and stored as one string, so any
template renders it. A ``response_format``, which OpenAI's chat API adds too, is
modelled in ``completion_queue/response_format.py``: the worker reads it back.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Most messages in one conversation.
MAX_MESSAGES = 256


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


def conversation_chars(messages: list[Message]) -> int:
    """Characters of text in ``messages`` (bounded like a prompt's)."""
    return sum(len(m.content) for m in messages)

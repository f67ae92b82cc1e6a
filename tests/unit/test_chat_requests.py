"""Chat requests, response formats and logprobs: validation and OpenAI mapping, no services."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from api.batch_output import CHAT_ENDPOINT, parse_input
from api.chat import chat_request
from api.views import chat_view
from completion_queue import ValidationError
from db import Choice, JobStatus
from producer.schema import Limits, validate_request
from tests.factories import make_job

LIMITS = Limits(max_prompt_chars=100, max_new_tokens=64, max_n=4)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def refused(data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_request(data, LIMITS)
    return info.value


def test_messages_are_stored_with_text_parts_joined() -> None:
    request = validate_request(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        },
        LIMITS,
    )
    assert request.prompt is None
    assert request.stored_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
    ]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({}, "prompt", "prompt is required (or messages, for a chat)"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "messages", "not both"),
        ({"messages": []}, "messages", "messages must have at least 1 item"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages", "must hold some text"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages", "at most 100 char"),
        ({"prompt": "x", "logprobs": -1}, "logprobs", "logprobs must be >= 0, got -1"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format", "type must be"),
        ({"prompt": "x", "response_format": "json"}, "response_format", "must be an object"),
        (
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a b", "schema": {}},
                },
            },
            "response_format",
            "name must be 1 to 64 letters",
        ),
        (
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "objekt"}},
                },
            },
            "response_format",
            "json_schema.schema is not a valid JSON Schema",
        ),
        (
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}},
                },
            },
            "response_format",
            'cannot be enforced: Unimplemented keys: ["uniqueItems"]',
        ),
        (
            {"prompt": "x", "response_format": {"type": "json_object", "schema": {}}},
            "response_format",
            "schema is not a known parameter",
        ),
    ],
)
def test_bad_chat_fields_are_named(data: dict[str, Any], field: str, message: str) -> None:
    error = refused(data)
    assert error.field == field
    assert message in str(error)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("caf\udce9", "must be valid UTF-8"),  # a Latin-1 byte read with surrogateescape
        ([{"type": "text", "text": "a\udcffb"}], "must be valid UTF-8"),  # JSON's "\udcff"
        ("a\x00b", "must not contain NUL"),
    ],
)
def test_chat_text_the_tokenizer_or_the_database_cannot_take_is_refused(
    content: object, message: str
) -> None:
    # Such text once reached the worker, whose tokenizer failed the whole batch again and again
    error = refused({"messages": [{"role": "user", "content": content}]})
    assert error.field == "messages[0].content"
    assert message in str(error)


def test_response_formats_and_logprobs_are_stored_in_params() -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    request = validate_request(
        {"prompt": "x", "logprobs": 3, "response_format": schema_format}, LIMITS
    )
    assert request.params()["logprobs"] == 3
    assert request.params()["response_format"] == schema_format
    # Given text (no constraint) and no logprobs, Then params are as before these fields existed
    plain = validate_request({"prompt": "x", "response_format": {"type": "text"}}, LIMITS)
    assert "response_format" not in plain.params()
    assert "logprobs" not in plain.params()


def test_openai_chat_parameters_map_to_one_request() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "ann"},
        ],
        "max_completion_tokens": 5,
        "temperature": 0,
        "n": 2,
        "stop": ".",
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 3,
        "user": "u",
        "metadata": {"k": "v"},
        "response_format": {"type": "json_object"},
        "stream": False,
        "tools": [],
    }
    assert chat_request(body) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "ann"},
        ],
        "max_new_tokens": 5,
        "temperature": 0,
        "n": 2,
        "stop": ".",
        "seed": 1,
        "response_format": {"type": "json_object"},
        "logprobs": 3,
    }
    assert chat_request({"messages": [{"role": "user", "content": "a"}], "logprobs": True}) == {
        "messages": [{"role": "user", "content": "a"}],
        "logprobs": 0,
    }


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ({"tools": [{"type": "function"}]}, "tools", "tools is not supported"),
        ({"audio": {"voice": "x"}}, "audio", "audio is not supported"),
        ({"stream": True}, "stream", "stream is not supported"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "differ"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20, got 21"),
        ({"metadata": {"k": 1}}, "metadata", "metadata keys"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "tools are not"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "images, audio and files are not supported",
        ),
        ({"messages": []}, "messages", "non-empty list"),
    ],
)
def test_unsupported_chat_parameters_are_refused_by_name(
    extra: dict[str, Any], field: str, message: str
) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], **extra}
    with pytest.raises(ValidationError) as info:
        chat_request(body)
    assert info.value.field == field
    assert message in str(info.value)


def test_chat_view_is_openai_chat_completion() -> None:
    job = make_job(
        "",
        status=JobStatus.SUCCEEDED,
        messages=[{"role": "user", "content": "Hi"}],
        choices=[Choice("Hello", "stop", 2), Choice("Hey there", "length", 3)],
        prompt_tokens=4,
        completion_tokens=5,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    view = chat_view(job, model="m")
    assert view["object"] == "chat.completion"
    assert view["id"] == f"chatcmpl-{job.id.hex}"
    assert [c["message"] for c in view["choices"]] == [
        {"role": "assistant", "content": "Hello", "refusal": None},
        {"role": "assistant", "content": "Hey there", "refusal": None},
    ]
    assert [c["finish_reason"] for c in view["choices"]] == ["stop", "length"]
    assert view["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert view["system_fingerprint"].startswith("fp_")
    assert job.summary == "user: Hi"


def test_chat_batch_lines_are_one_request_each() -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": CHAT_ENDPOINT,
        "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    }
    wrong = {**line, "custom_id": "b", "url": "/v1/completions"}
    content = (json.dumps(line) + "\n").encode()
    assert parse_input(content, LIMITS, 10, CHAT_ENDPOINT) == [
        ("a", [{"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 3}])
    ]
    with pytest.raises(ValidationError, match="line 2: method must be POST and url /v1/chat"):
        parse_input(content + (json.dumps(wrong) + "\n").encode(), LIMITS, 10, CHAT_ENDPOINT)


def test_a_model_without_a_chat_template_fails_the_job_naming_it() -> None:
    from completion_queue import NoChatTemplate
    from engine import render_chat

    class PlainTokenizer:
        chat_template = None

    with pytest.raises(NoChatTemplate, match="model 'plain-lm' has no chat template"):
        render_chat(PlainTokenizer(), [{"role": "user", "content": "Hi"}], model="plain-lm")


def test_an_echoed_assistant_message_with_neutral_fields_is_accepted() -> None:
    # What the openai client sends for messages.append(completion.choices[0].message).
    echoed = {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": None,
    }
    body = {"messages": [{"role": "user", "content": "Hi"}, echoed]}
    assert chat_request(body)["messages"][1] == {"role": "assistant", "content": "Hello"}
    with pytest.raises(ValidationError, match=r"messages\[1\]\.refusal is not a supported"):
        chat_request({"messages": [{"role": "user", "content": "Hi"}, {**echoed, "refusal": "no"}]})

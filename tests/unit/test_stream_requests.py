"""``stream`` and ``stream_options`` on the OpenAI routes: taken where the route streams only."""

from __future__ import annotations

from typing import Any

import pytest

from api.chat import chat_request
from api.openai import completion_requests, stream_usage
from api.streaming import sse
from completion_queue import ValidationError

USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"stream": False}, None),
        ({"stream": None}, None),
        ({"stream": True}, False),
        ({"stream": True, "stream_options": {}}, False),
        ({"stream": True, "stream_options": {"include_usage": False}}, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True),
    ],
)
def test_stream_usage_says_whether_to_stream_and_send_the_usage(
    body: dict[str, Any], expected: bool | None
) -> None:
    assert stream_usage(body) is expected


def test_a_streamed_completion_queues_jobs_that_stream() -> None:
    body = {
        "prompt": ["a", "b"],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert completion_requests(body, max_prompts=2, streaming=True) == [
        {"prompt": "a", "max_new_tokens": 3, "stream": True},
        {"prompt": "b", "max_new_tokens": 3, "stream": True},
    ]
    # stream: false asks for nothing more
    assert completion_requests({"prompt": "a", "stream": False}, 1, streaming=True) == [
        {"prompt": "a"}
    ]


def test_a_streamed_chat_queues_a_job_that_streams() -> None:
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": False}}
    assert chat_request(body, streaming=True) == {"messages": USER, "stream": True}
    assert chat_request({"messages": USER, "stream": False, "logprobs": True}, streaming=True) == {
        "messages": USER,
        "logprobs": 0,
    }


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ({"stream": "yes"}, "stream", "stream must be a boolean"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
        ({"stream": True, "stream_options": []}, "stream_options", 'only "include_usage"'),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options",
            'only "include_usage"',
        ),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "must be a boolean",
        ),
    ],
)
def test_malformed_stream_parameters_are_refused_by_name(
    extra: dict[str, Any], field: str, message: str
) -> None:
    for call in (
        lambda: completion_requests({"prompt": "a", **extra}, 1, streaming=True),
        lambda: chat_request({"messages": USER, **extra}, streaming=True),
    ):
        with pytest.raises(ValidationError) as refused:
            call()
        assert refused.value.field == field
        assert message in str(refused.value)


def test_logprobs_cannot_be_streamed() -> None:
    with pytest.raises(ValidationError, match="logprobs is not supported with stream") as legacy:
        completion_requests({"prompt": "a", "stream": True, "logprobs": 2}, 1, streaming=True)
    with pytest.raises(ValidationError, match="logprobs is not supported with stream") as chat:
        chat_request({"messages": USER, "stream": True, "logprobs": True}, streaming=True)
    assert legacy.value.field == chat.value.field == "logprobs"


def test_a_batch_line_still_refuses_stream() -> None:
    # Batches map their lines without streaming=True: stream: true is refused there
    with pytest.raises(ValidationError, match="stream is not supported"):
        completion_requests({"prompt": "a", "stream": True}, 1)
    with pytest.raises(ValidationError, match="stream_options is not supported"):
        chat_request({"messages": USER, "stream_options": {"include_usage": True}})


def test_an_event_is_one_line_of_compact_json() -> None:
    event = sse({"text": "two\nlines é"}, event="delta")
    assert event == 'event: delta\ndata: {"text":"two\\nlines é"}\n\n'.encode()

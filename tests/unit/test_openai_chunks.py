"""The streamed chunks of both OpenAI completion shapes, from one generator: their bytes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from api.shapes import CHAT_COMPLETION, TEXT_COMPLETION, CompletionShape
from api.streaming import DONE, StreamedCall, openai_chunks
from api.views import ErrorInfo, system_fingerprint
from db import Choice, Job, JobStatus
from producer import Delta, Finished
from tests.factories import make_job

CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def running(number: int, n: int = 2) -> Job:
    return make_job("p", id=uuid.UUID(int=number), params={"n": n}, created_at=CREATED)


def finished(job: Job, *choices: Choice) -> Job:
    tokens = sum(c.completion_tokens for c in choices)
    return make_job(
        "p",
        id=job.id,
        params=job.params,
        created_at=CREATED,
        status=JobStatus.SUCCEEDED,
        choices=list(choices),
        prompt_tokens=2,
        completion_tokens=tokens,
    )


def stream(
    shape: CompletionShape,
    jobs: list[Job],
    outcomes: list[Delta | Finished | ErrorInfo],
    *,
    include_usage: bool,
) -> list[bytes]:
    """Run :func:`openai_chunks` over ``outcomes`` as the call's jobs would yield them."""
    call = StreamedCall(None, jobs, lambda: None, 1.0)  # type: ignore[arg-type]

    async def given() -> AsyncIterator[Delta | Finished | ErrorInfo]:
        for outcome in outcomes:
            yield outcome

    call.outcomes = given  # type: ignore[method-assign]

    async def collect() -> list[bytes]:
        return [chunk async for chunk in openai_chunks(call, shape, include_usage=include_usage)]

    return anyio.run(collect)


def parsed(chunks: list[bytes]) -> list[dict[str, Any]]:
    assert chunks[-1] == DONE
    assert all(c.startswith(b"data: {") and c.endswith(b"}\n\n") for c in chunks[:-1])
    return [json.loads(c.removeprefix(b"data: ")) for c in chunks[:-1]]


def test_text_chunks_number_choices_prompt_by_prompt_and_end_with_the_usage() -> None:
    # Given two prompts of n=2 whose choices stream interleaved
    a, b = running(1), running(2)
    done_a = finished(a, Choice("x", "stop", 1), Choice("yé", "length", 2))
    done_b = finished(b, Choice("z", "stop", 1), Choice("w", "stop", 1))
    outcomes: list[Delta | Finished | ErrorInfo] = [
        Delta(a.id, 0, "x"),
        Delta(b.id, 1, "w"),
        Finished(done_b),
        Delta(a.id, 1, "yé"),
        Finished(done_a),
    ]
    # When they stream with include_usage
    chunks = stream(TEXT_COMPLETION, [a, b], outcomes, include_usage=True)
    # Then each chunk is compact JSON, choices are numbered prompt * n + choice,
    # each job's end sends its choices' finish reasons, and a last chunk holds the usage
    assert chunks[0] == (
        b'data: {"id":"cmpl-00000000000000000000000000000001","object":"text_completion",'
        b'"created":1767225600,"model":"m","choices":[{"text":"x","index":0,"logprobs":null,'
        b'"finish_reason":null}],"usage":null}\n\n'
    )
    bodies = parsed(chunks)
    assert {(body["id"], body["object"]) for body in bodies} == {
        (f"cmpl-{a.id.hex}", "text_completion")
    }
    assert [(c["text"], c["index"], c["finish_reason"]) for b in bodies for c in b["choices"]] == [
        ("x", 0, None),
        ("w", 3, None),
        ("", 2, "stop"),
        ("", 3, "stop"),
        ("yé", 1, None),
        ("", 0, "stop"),
        ("", 1, "length"),
    ]
    assert [body["usage"] for body in bodies[:-1]] == [None] * 7
    assert bodies[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


def test_chat_chunks_open_with_the_role_per_choice_and_end_with_empty_deltas() -> None:
    job = running(3)
    done = finished(job, Choice("hi", "stop", 1), Choice("yo", "length", 1))
    outcomes: list[Delta | Finished | ErrorInfo] = [
        Delta(job.id, 1, "yo"),
        Delta(job.id, 0, "hi"),
        Finished(done),
    ]
    bodies = parsed(stream(CHAT_COMPLETION, [job], outcomes, include_usage=False))
    assert all(
        list(body)
        == ["id", "object", "created", "model", "system_fingerprint", "choices"]  # no usage
        for body in bodies
    )
    assert bodies[0]["system_fingerprint"] == system_fingerprint("m")
    assert {(body["id"], body["object"]) for body in bodies} == {
        (f"chatcmpl-{job.id.hex}", "chat.completion.chunk")
    }
    assert [(c["index"], c["delta"], c["finish_reason"]) for b in bodies for c in b["choices"]] == [
        (0, {"role": "assistant", "content": ""}, None),
        (1, {"role": "assistant", "content": ""}, None),
        (1, {"content": "yo"}, None),
        (0, {"content": "hi"}, None),
        (0, {}, "stop"),
        (1, {}, "length"),
    ]


@pytest.mark.parametrize("shape", [TEXT_COMPLETION, CHAT_COMPLETION])
def test_a_failure_ends_either_stream_with_the_error_and_no_usage(shape: CompletionShape) -> None:
    job = running(4, n=1)
    failure = ErrorInfo(500, "generation failed: boom", "server_error", code="ModelError")
    chunks = stream(shape, [job], [Delta(job.id, 0, "a"), failure], include_usage=True)
    assert chunks[-2] == (
        b'data: {"error":{"message":"generation failed: boom","type":"server_error",'
        b'"param":null,"code":"ModelError"}}\n\n'
    )
    assert all(b'"usage":{' not in chunk for chunk in chunks)

"""Streaming for real: a real worker, a real `cq api`, the official `openai` client, `cq`.

Besides the stack's worker, a second worker serves the same tiny model under another
name with every decoding step slowed (``slow_model`` in conftest.py), as a big
model's step takes time: its jobs run for seconds, so a test sees text arrive
while the job is still running, and can leave in the middle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.streaming import PING_INTERVAL_S
from completion_queue import WorkerProcess, free_port, queue_name, worker_env
from db import JobStatus
from producer import CompletionClient
from tests.conftest import Stack, until
from tests.integration.test_api import KEY, Api, serving, start_api
from tests.reference import Reference

pytestmark = pytest.mark.timeout(300)

#: A prompt whose greedy text runs to LONG tokens without an end token.
PROMPT, LONG = "The queue takes a job", 160
OTHER_KEY = "other-key"


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    log = tmp_path_factory.mktemp("streaming-api") / "api.log"
    with serving(stack, log, CQ_API_KEYS=f"{OTHER_KEY},{KEY}") as api:
        yield api


def read_events(response: httpx.Response) -> Iterator[tuple[str | None, str]]:
    """The (event, data) pairs of a Server-Sent Events body, as they come."""
    event: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())


def job_of(chunk_id: str) -> uuid.UUID:
    """The job id in a chunk's id (``cmpl-<hex>``, ``chatcmpl-<hex>``)."""
    return uuid.UUID(chunk_id.rsplit("-", 1)[1])


def test_streamed_completions_equal_the_greedy_text_with_usage(
    api: Api, client: CompletionClient
) -> None:
    oai = api.openai()
    prompts = ["Once upon a time", "The queue takes a job and"]
    asked = {"model": api.model, "prompt": prompts, "max_tokens": 12, "temperature": 0, "n": 1}
    # When the official client streams greedy completions of two prompts, asking for usage
    chunks = list(
        oai.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    )
    whole = oai.completions.create(**asked)
    # Then each choice's deltas, joined, are the non-streamed text
    texts: dict[int, str] = {}
    finishes: dict[int, list[str | None]] = {}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.usage is None
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert [texts[i] for i in (0, 1)] == [c.text for c in whole.choices]
    # And only each choice's last chunk has its finish_reason
    for index, reasons in finishes.items():
        assert reasons[-1] == whole.choices[index].finish_reason
        assert set(reasons[:-1]) <= {None}
    # And the last chunk holds no choice, and the usage of the two jobs
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert len({chunk.id for chunk in chunks}) == 1
    # And the call queued two streamed jobs (the other call two plain ones)
    streamed = [job for job in client.list(limit=10) if job.params.get("stream")]
    assert len(streamed) == 2 and job_of(chunks[0].id) in {job.id for job in streamed}


def test_streamed_chat_equals_the_greedy_reply(api: Api, reference: Reference) -> None:
    oai = api.openai()
    messages = [{"role": "user", "content": "Tell me about the river."}]
    # When the official client streams a greedy chat completion without asking for usage
    chunks = list(
        oai.chat.completions.create(
            model=api.model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
    )
    # Then the first chunk gives the role, the content deltas join into the direct generate's
    # text, and the last chunk has an empty delta and the finish_reason
    text, tokens = reference.greedy_ids(reference.chat_ids(messages), 12)
    assert all(chunk.object == "chat.completion.chunk" and chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    last = chunks[-1].choices[0]
    assert last.finish_reason == ("length" if tokens == 12 else "stop")
    assert last.delta.content is None and last.delta.role is None
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


#: A chat reply of the tiny model ends after a few tokens; a schema asking for a long string
#: keeps it generating (constrained decoding allows no end before the JSON is complete).
LONG_REPLY = {
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "schema": {
            "type": "object",
            "properties": {"story": {"type": "string", "minLength": 200}},
            "required": ["story"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_the_first_chunk_arrives_while_the_job_runs(
    api: Api, client: CompletionClient, reference: Reference, slow_model: str, route: str
) -> None:
    oai: Any = api.openai()
    usage_asked = {"include_usage": True}
    # When a long greedy completion on the slowed worker is streamed
    if route == "completions":
        stream = oai.completions.create(
            model=slow_model,
            prompt=PROMPT,
            max_tokens=LONG,
            temperature=0,
            stream=True,
            stream_options=usage_asked,
        )
        text_of = lambda chunk: chunk.choices[0].text  # noqa: E731
    else:
        stream = oai.chat.completions.create(
            model=slow_model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=LONG,
            temperature=0,
            response_format=LONG_REPLY,
            stream=True,
            stream_options=usage_asked,
        )
        text_of = lambda chunk: chunk.choices[0].delta.content or ""  # noqa: E731
    status_at_first_text, usage, job_id = None, None, None
    parts = []
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        text = text_of(chunk)
        if text and status_at_first_text is None:
            job_id = job_of(chunk.id)
            status_at_first_text = client.get(job_id).status
        parts.append(text)
    # Then text came while the job was still running, in several deltas that join into its
    # final text (for a prompt, the greedy text of a direct generate)
    assert job_id is not None
    job = client.get(job_id)
    assert status_at_first_text is JobStatus.RUNNING
    assert len([p for p in parts if p]) > 2
    assert "".join(parts) == job.text
    assert job.completion_tokens is not None and job.completion_tokens > 20
    if route == "completions":
        assert job.text == reference.greedy(PROMPT, LONG)[0]
    # And the usage chunk counts every token
    assert usage is not None and usage.completion_tokens == job.completion_tokens
    assert usage.prompt_tokens == job.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_streaming_client_that_leaves_cancels_its_job(
    api: Api, client: CompletionClient, slow_model: str
) -> None:
    body = {
        "model": slow_model,
        "prompt": PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
    }
    # Given a long job streaming to a client
    with api.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for _, data in read_events(response):
            chunk = json.loads(data)
            if chunk["choices"][0]["text"]:
                job_id = job_of(chunk["id"])
                assert client.get(job_id).status is JobStatus.RUNNING
                break
        # When the client goes away in the middle (the connection closes)
    # Then its job is cancelled, and its row keeps the tokens generated up to then
    until(lambda: client.get(job_id).status is JobStatus.CANCELLED, timeout_s=30)
    until(lambda: client.get(job_id).choices, timeout_s=30)
    job = client.get(job_id)
    assert job.choices[0].finish_reason == "cancelled"
    assert 0 < job.choices[0].completion_tokens < LONG


#: How long a streamed call's job cannot start at least (no worker serves its model yet):
#: longer than the ping interval, and than the read timeout of the client below.
HOLD_S = 20.0
#: The client's read timeout, as a proxy's ``proxy_read_timeout``: above the ping interval,
#: below the silence before the first token.
READ_TIMEOUT_S = 18.0


@pytest.mark.waits
def test_a_call_whose_job_waits_in_the_queue_is_kept_alive_by_pings(
    stack: Stack, client: CompletionClient, reference: Reference, tiny_model: Path, tmp_path: Path
) -> None:
    if stack.backend != "sqlite":
        pytest.skip("pings come from the API's event stream, whatever the database: one is enough")
    # Given an API whose model (the tiny one under another name) no worker serves yet, and a
    # worker for it that starts only at the first ping HOLD_S or more after the call (its job
    # cannot start before; the call stays within CQ_API_WAIT_TIMEOUT_S, 60 s)
    name = tmp_path / "late-tiny"
    name.symlink_to(tiny_model, target_is_directory=True)
    process, url = start_api(stack, tmp_path / "api.log", CQ_API_KEYS=KEY, CQ_MODEL=str(name))
    settings = stack.settings.model_copy(
        update={"model": str(name), "data_dir": tmp_path, "metrics_port": free_port()}
    )
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log")
    auth = {"Authorization": f"Bearer {KEY}"}
    http = httpx.Client(base_url=url, headers=auth, timeout=httpx.Timeout(10, read=READ_TIMEOUT_S))
    body = {"model": str(name), "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    lines: list[tuple[float, str]] = []
    try:
        # When a client whose reads time out after READ_TIMEOUT_S streams a completion
        with http.stream("POST", "/v1/completions", json=body) as response:
            called = time.monotonic()
            for line in response.iter_lines():
                lines.append((time.monotonic() - called, line))
                # The first ping HOLD_S or more after the call starts the model's worker
                if line.startswith(":") and lines[-1][0] >= HOLD_S and worker.process is None:
                    worker.start()
    finally:
        worker.stop()
        http.close()
        process.terminate()
        process.wait(30)
        keys = stack.redis.keys(queue_name(str(name)) + "*")
        if keys:
            stack.redis.delete(*keys)
    # Then pings (SSE comments) came while the job waited, one every PING_INTERVAL_S before
    # its first token, and kept the connection open past the client's read timeout
    pings = [(at, line) for at, line in lines if line.startswith(":")]
    data = [(at, line.removeprefix("data: ")) for at, line in lines if line.startswith("data:")]
    assert all(line.startswith(": ping") for _, line in pings), lines
    before = [at for at, _ in pings if at < data[0][0]]
    assert len(before) >= 2, lines
    for number, at in enumerate(before, start=1):
        assert number * PING_INTERVAL_S - 1 < at < number * PING_INTERVAL_S + 3, lines
    assert data[0][0] >= HOLD_S > READ_TIMEOUT_S > PING_INTERVAL_S
    # And the stream then went on as any: chunks joining into the greedy text, then [DONE]
    assert data[-1][1] == "[DONE]"
    chunks = [json.loads(payload) for _, payload in data[:-1]]
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    job = client.get(job_of(chunks[0]["id"]))
    assert job.status is JobStatus.SUCCEEDED and text == job.text
    assert text == reference.greedy(PROMPT, 8)[0]
    # And the job did wait in the queue all that time
    assert job.started_at is not None
    assert (job.started_at - job.created_at).total_seconds() >= HOLD_S


def test_an_api_told_to_stop_finishes_its_open_streams(
    stack: Stack, client: CompletionClient, slow_model: str, tmp_path: Path
) -> None:
    process, url = start_api(stack, tmp_path / "api.log", CQ_API_KEYS=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": slow_model,
        "prompt": PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
    }
    try:
        # Given a long job streaming to a client
        with (
            httpx.Client(base_url=url, headers=auth, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            events = read_events(response)
            _, first = next(events)
            assert client.get(job_of(json.loads(first)["id"])).status is JobStatus.RUNNING
            # When the API is told to stop (SIGTERM, as a restart does) in the middle
            process.terminate()
            rest = [data for _, data in events]
    finally:
        process.terminate()
        # uvicorn waits for the open stream before it exits
        process.wait(30)
    # Then the stream ran to its end: the job's whole text, then [DONE]
    chunks = [json.loads(data) for data in [first, *rest[:-1]]]
    job = client.get(job_of(chunks[0]["id"]))
    assert rest[-1] == "[DONE]" and job.status is JobStatus.SUCCEEDED
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == job.text
    assert job.completion_tokens == LONG


def test_a_job_that_fails_ends_the_stream_with_an_error(api: Api, client: CompletionClient) -> None:
    # Given a prompt too long for the model's context: its job fails when it runs
    body = {
        "model": api.model,
        "prompt": "Once upon a time " * 200,
        "max_tokens": 4,
        "stream": True,
    }
    # When it is streamed
    with api.http.stream("POST", "/v1/completions", json=body) as response:
        events = [data for _, data in read_events(response)]
    # Then the stream ends with the error a call without stream answers, in OpenAI's shape,
    # then [DONE]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    # And the official client raises it
    with pytest.raises(openai.APIError) as raised:
        list(api.openai().completions.create(**body))
    assert raised.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_a_late_client_of_job_events_first_gets_the_text_so_far(
    api: Api, client: CompletionClient, reference: Reference, slow_model: str
) -> None:
    # Given a streamed native job that has been running for a while
    submitted = api.http.post(
        "/v1/jobs",
        json={
            "prompt": PROMPT,
            "model": slow_model,
            "max_new_tokens": LONG,
            "temperature": 0,
            "stream": True,
        },
    )
    job_id = submitted.json()["ids"][0]
    until(lambda: (client.get(job_id).completion_tokens or 0) > 10, timeout_s=60)
    so_far = client.get(job_id).choices[0].text
    # When a client connects to its events
    with api.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    # Then its first delta holds at least what the row showed before, the deltas join into
    # the greedy text, and the end holds the job as GET /v1/jobs/{id} shows it
    kinds = [kind for kind, _ in events]
    assert set(kinds[:-1]) == {"delta"} and kinds[-1] == "end"
    deltas = [json.loads(data) for _, data in events[:-1]]
    assert so_far and deltas[0]["text"].startswith(so_far)
    assert {d["choice"] for d in deltas} == {0}
    expected, _ = reference.greedy(PROMPT, LONG)
    assert "".join(d["text"] for d in deltas) == expected
    end = json.loads(events[-1][1])
    assert end == api.http.get(f"/v1/jobs/{job_id}").json()
    assert end["status"] == "succeeded" and end["choices"][0]["text"] == expected


def test_job_events_of_a_job_without_stream_come_from_its_row(
    api: Api, client: CompletionClient, reference: Reference, slow_model: str
) -> None:
    # Given a long job submitted without stream: only its row shows its progress
    body = {"prompt": PROMPT, "model": slow_model, "max_new_tokens": LONG, "temperature": 0}
    job_id = api.http.post("/v1/jobs", json=body).json()["ids"][0]
    # When a client follows its events from the start
    with api.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        events = list(read_events(response))
    # Then several deltas came from the row's refreshes, and they join into the final text
    deltas = [json.loads(data)["text"] for kind, data in events if kind == "delta"]
    expected, _ = reference.greedy(PROMPT, LONG)
    assert len(deltas) > 2 and "".join(deltas) == expected
    assert events[-1][0] == "end" and json.loads(events[-1][1])["status"] == "succeeded"


def test_job_events_answer_404_as_the_job_does(api: Api, client: CompletionClient) -> None:
    other = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    job_id = api.http.post("/v1/jobs", json={"prompt": "x", "max_new_tokens": 1}).json()["ids"][0]
    # An unknown id, an id that is not one, and another tenant's job: 404 as GET /v1/jobs/{id}
    for http, ident in [(api.http, str(uuid.uuid4())), (api.http, "nope"), (other, job_id)]:
        events = http.get(f"/v1/jobs/{ident}/events")
        plain = http.get(f"/v1/jobs/{ident}")
        assert events.status_code == plain.status_code == 404
        assert events.json() == plain.json()
    other.close()


def test_client_stream_yields_the_text_as_it_generates(
    client: CompletionClient, reference: Reference, slow_model: str
) -> None:
    # When the Python client streams a streamed job on the slowed worker
    job = client.submit(PROMPT, model=slow_model, max_new_tokens=LONG, temperature=0, stream=True)
    parts, statuses = [], []
    for text in client.stream(job.id):
        parts.append(text)
        statuses.append(client.get(job.id).status)
    # Then its deltas came while it ran, and join into the final text
    final = client.get(job.id)
    assert final.status is JobStatus.SUCCEEDED
    assert "".join(parts) == final.text == reference.greedy(PROMPT, LONG)[0]
    assert len(parts) > 2 and statuses[0] is JobStatus.RUNNING


def test_client_stream_left_early_closes_its_broker_connection(
    stack: Stack, client: CompletionClient, slow_model: str
) -> None:
    def readers() -> int:
        """Broker connections that read events streams (XREAD is all a reader sends)."""
        return sum(1 for info in stack.redis.client_list() if info["cmd"] == "xread")

    # Given a long streamed job whose first two deltas the Python client has read (the first
    # may come from its row, the second comes from XREAD)
    job = client.submit(PROMPT, model=slow_model, max_new_tokens=LONG, temperature=0, stream=True)
    reader = client.stream(job.id)
    assert next(reader) and next(reader)
    assert readers() == 1
    # When the reader leaves in the middle
    reader.close()
    # Then its connection is closed at once, while the job goes on
    assert readers() == 0
    assert client.get(job.id).status is JobStatus.RUNNING
    client.cancel(job.id)
    until(lambda: client.get(job.id).status is JobStatus.CANCELLED, timeout_s=30)


def test_cq_submit_stream_prints_tokens_as_they_come(
    stack: Stack, client: CompletionClient, reference: Reference, slow_model: str
) -> None:
    env = {**os.environ, **worker_env(stack.settings)}
    args = [
        sys.executable,
        "-m",
        "cli",
        "submit",
        PROMPT,
        "--model",
        slow_model,
        "--max-new-tokens",
        str(LONG),
        "--temperature",
        "0",
        "--stream",
    ]
    # When `cq submit --stream` runs a long job
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    first = process.stdout.read1(4096)  # type: ignore[attr-defined]
    # Then the first text is printed while the job still runs
    running = client.list(limit=1)
    assert first and running[0].status is JobStatus.RUNNING
    out, err = process.communicate(timeout=120)
    # And the whole text, then a newline, is printed, with exit status 0
    assert process.returncode == 0, err.decode()
    assert (first + out).decode() == reference.greedy(PROMPT, LONG)[0] + "\n"
    assert running[0].params.get("stream") is True

    # When a streamed job is cancelled while it prints
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.read1(4096)  # type: ignore[attr-defined]
    client.cancel(client.list(limit=1)[0].id)
    _, err = process.communicate(timeout=120)
    # Then it exits 1, saying so
    assert process.returncode == 1
    assert "cancelled" in err.decode()

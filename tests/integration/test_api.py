"""The HTTP API for real: `cq api` under uvicorn, a real Redis, a real worker, the database.

Driven with httpx and with the official `openai` package, as other services drive it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import update

from completion_queue import free_port, queue_name, worker_env
from db import BatchRow, JobRow, JobStatus
from producer import CompletionClient
from tests.conftest import Stack, until
from tests.integration.conftest import HookServer
from tests.reference import Reference

KEY = "test-key-1"
SECRET = "webhook-secret"
MAX_BODY_BYTES = 256 * 1024
#: A model no worker serves: its jobs stay queued until cancelled.
NO_WORKER = "api-test-no-worker"


@dataclass
class Api:
    """A running `cq api` process and an httpx client that sends its key."""

    url: str
    http: httpx.Client
    model: str

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def start_api(stack: Stack, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start `cq api` on a free port with the stack's settings; return it when /healthz answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "api", "--port", str(port)],
            env={**os.environ, **worker_env(stack.settings), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    until(lambda: _healthy(url) or process.poll() is not None, timeout_s=60)
    assert process.poll() is None, log.read_text()
    return process, url


@contextlib.contextmanager
def serving(stack: Stack, log: Path, **env: str) -> Iterator[Api]:
    """A `cq api` started as :func:`start_api` does, its key sent; stopped on exit."""
    process, url = start_api(stack, log, **env)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    try:
        yield Api(url=url, http=http, model=stack.settings.model)
    finally:
        http.close()
        process.terminate()
        process.wait(30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    log = tmp_path_factory.mktemp("api") / "api.log"
    process, url = start_api(
        stack,
        log,
        CQ_API_KEYS=f"other-key,{KEY}",
        CQ_WEBHOOK_SECRET=SECRET,
        CQ_WEBHOOK_BACKOFF_S="0.2",
        CQ_WEBHOOK_POLL_MS="50",
        CQ_WEBHOOK_ALLOW_PRIVATE="true",
        CQ_API_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        CQ_API_PAGE_SIZE="2",
    )
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield Api(url=url, http=http, model=stack.settings.model)
    http.close()
    process.terminate()
    process.wait(30)


def wait_job(api: Api, job_id: str) -> dict[str, Any]:
    return until(
        lambda: (
            (job := api.http.get(f"/v1/jobs/{job_id}").json())["status"]
            not in ("queued", "running")
            and job
        )
    )


def assert_error(response: httpx.Response, status: int, param: str | None, text: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert text in error["message"]
    assert "Traceback" not in response.text


def test_health_ready_and_keys(api: Api) -> None:
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    ready = {"status": "ok", "database": True, "broker": True}
    assert httpx.get(f"{api.url}/readyz").json() == ready
    anonymous = httpx.get(f"{api.url}/v1/jobs")
    assert_error(anonymous, 401, None, "API key")
    wrong = httpx.get(f"{api.url}/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, None, "API key")
    assert httpx.get(f"{api.url}/v1/jobs", headers={"Authorization": "Bearer other-key"}).is_success


def test_a_503_tells_the_client_nothing_of_the_broker(stack: Stack, tmp_path: Path) -> None:
    # Given an API whose broker is down, its URL holding a password, in both places
    port = free_port()
    broker = f"redis://:hunter2@127.0.0.1:{port}/0?password=hunter3"
    log = tmp_path / "api.log"
    process, url = start_api(stack, log, CQ_API_KEYS=KEY, CQ_BROKER_URL=broker)
    try:
        # When a job is submitted, and readiness asked
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            refused = http.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 2}, timeout=60)
            ready = http.get("/readyz", timeout=30)
    finally:
        process.terminate()
        process.wait(30)
    # Then the client reads a generic 503, and which part is down: no host, port or password
    assert_error(refused, 503, None, "the queue is unavailable; retry later")
    assert refused.json()["error"]["code"] == "unavailable"
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": True, "broker": False}
    for body in (refused.text, ready.text):
        assert "hunter" not in body and "127.0.0.1" not in body and str(port) not in body
    # and the log has the detail, its passwords redacted
    logged = log.read_text()
    assert f"queue unavailable: could not queue 1 job(s) on redis://:***@127.0.0.1:{port}" in logged
    assert "not ready: broker:" in logged and "hunter" not in logged


def test_native_jobs_submit_read_list_cancel(
    api: Api, client: object, reference: Reference
) -> None:
    # Given one greedy job, then a list of three
    one = api.http.post(
        "/v1/jobs",
        json={
            "prompt": "Once upon a time",
            "max_new_tokens": 6,
            "temperature": 0,
            "model": api.model,
        },
    )
    assert one.status_code == 202 and one.headers["location"].startswith("/v1/jobs/")
    job_id = one.json()["ids"][0]
    prompts = ["The weather", "def add(a, b):", "Dear team,"]
    many = api.http.post(
        "/v1/jobs", json=[{"prompt": p, "max_new_tokens": 4, "temperature": 0} for p in prompts]
    )
    assert many.status_code == 202
    batch_id, ids = many.json()["batch_id"], many.json()["ids"]
    # Then the single job's text is what a direct generate gives
    job = wait_job(api, job_id)
    text, n_tokens = reference.greedy("Once upon a time", 6)
    assert job["status"] == "succeeded"
    assert job["choices"][0]["text"] == text
    assert job["usage"]["completion_tokens"] == n_tokens
    assert job["timings"]["total_s"] > 0
    # And the list pages through its batch two at a time (page size 2), newest first
    for job_id_ in ids:
        wait_job(api, job_id_)
    first = api.http.get("/v1/jobs", params={"batch_id": batch_id}).json()
    assert first["has_more"] and len(first["data"]) == 2
    second = api.http.get(
        "/v1/jobs", params={"batch_id": batch_id, "cursor": first["next_cursor"]}
    ).json()
    assert not second["has_more"] and second["next_cursor"] is None
    seen = [j["id"] for j in first["data"] + second["data"]]
    assert seen == list(reversed(ids))
    succeeded = api.http.get("/v1/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert len(succeeded["data"]) == 1
    # And a finished job cannot be cancelled; unknown ids are 404
    assert_error(api.http.post(f"/v1/jobs/{job_id}/cancel"), 409, None, "already succeeded")
    assert_error(api.http.get("/v1/jobs/not-a-uuid"), 404, "id", "no job")
    assert_error(api.http.get(f"/v1/jobs/{'0' * 32}"), 404, "id", "no job")


@pytest.fixture
def unserved_queue(stack: Stack) -> Iterator[None]:
    """Drop the messages left for a model no worker serves, so other tests see no such queue."""
    yield
    keys = stack.redis.keys(queue_name(NO_WORKER) + "*")
    if keys:
        stack.redis.delete(*keys)


@pytest.mark.usefixtures("unserved_queue")
def test_cancel_queued_job(api: Api, client: object) -> None:
    # A job for a model no worker serves stays queued until cancelled
    job_id = api.http.post("/v1/jobs", json={"prompt": "x", "model": NO_WORKER}).json()["ids"][0]
    cancelled = api.http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


@pytest.mark.usefixtures("unserved_queue")
def test_a_model_no_worker_serves_is_refused_at_once(api: Api, client: CompletionClient) -> None:
    # Given a model no live worker serves and no list names (the API's CQ_MODEL is another)
    body = {"model": NO_WORKER, "prompt": "x", "max_tokens": 2}
    # When a completion asks for it, over HTTP and through the official client
    refused = api.http.post("/v1/completions", json=body)
    with pytest.raises(openai.NotFoundError) as raised:
        api.openai().completions.create(**body)  # type: ignore[call-overload]
    # Then 404 model_not_found at once, naming what is served, and nothing was queued
    assert_error(refused, 404, "model", f"served now: {api.model}")
    assert refused.json()["error"]["code"] == "model_not_found"
    assert raised.value.code == "model_not_found"
    assert client.list(status="queued") == []


@pytest.mark.usefixtures("unserved_queue")
def test_a_hundred_waiting_completions_hold_no_thread(
    stack: Stack, client: CompletionClient, tmp_path: Path
) -> None:
    # Given an API whose configured model (CQ_MODEL) no worker serves yet, so calls wait,
    # and 100 /v1/completions calls waiting at once
    process, url = start_api(stack, tmp_path / "api.log", CQ_API_KEYS=KEY, CQ_MODEL=NO_WORKER)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def complete(_: int) -> httpx.Response:
        return http.post("/v1/completions", json={"model": NO_WORKER, "prompt": "x"})

    try:
        with ThreadPoolExecutor(100) as pool:
            calls = [pool.submit(complete, i) for i in range(100)]
            try:
                until(lambda: len(client.list(status="queued", limit=1000)) == 100, timeout_s=60)
                # Then /healthz answers while they wait, every time (a thread per waiting call
                # would leave none: it would time out). The bound is loose for a busy machine;
                # the figure is printed (30-90 ms on 2 cores).
                latencies = []
                for _ in range(20):
                    started = time.perf_counter()
                    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                    latencies.append(time.perf_counter() - started)
                print(f"healthz with 100 completions waiting: max {max(latencies) * 1000:.1f} ms")
                assert max(latencies) < 1.0
            finally:
                # and every waiting call answers as soon as its job ends (here: cancelled)
                for job in client.list(status="queued", limit=1000):
                    client.cancel(job.id)
            answers = [call.result(timeout=30) for call in calls]
    finally:
        http.close()
        process.terminate()
        process.wait(30)
    assert {answer.status_code for answer in answers} == {409}
    assert answers[0].json()["error"]["code"] == "cancelled"


@pytest.mark.usefixtures("unserved_queue")
def test_a_completion_whose_client_gave_up_is_cancelled_and_so_are_its_retries(
    stack: Stack, client: CompletionClient, tmp_path: Path
) -> None:
    # Given an API whose configured model no worker serves yet, so a completion waits
    process, url = start_api(stack, tmp_path / "api.log", CQ_API_KEYS=KEY, CQ_MODEL=NO_WORKER)
    try:
        # When the official client, at its default two retries, gives up on each try after 1 s
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            oai.completions.create(model=NO_WORKER, prompt="x", max_tokens=2)
        # Then each try's job is cancelled once its caller is gone: none is left to run
        jobs = until(lambda: (j := client.list(limit=10)) and len(j) == 3 and j, timeout_s=30)
        until(lambda: all(client.get(j.id).status is JobStatus.CANCELLED for j in jobs), 30)
    finally:
        process.terminate()
        process.wait(30)


def test_bad_requests_name_the_field(api: Api, client: object) -> None:
    assert_error(
        api.http.post("/v1/jobs", json={"prompt": "hi", "temperature": -1}),
        400,
        "temperature",
        "temperature must be >= 0, got -1",
    )
    assert_error(
        api.http.post("/v1/jobs", json=[{"prompt": "ok"}, {"prompt": "hi", "colour": 1}]),
        400,
        "colour",
        "requests[1]: colour is not a known parameter",
    )
    assert_error(
        api.http.post("/v1/jobs", json={"prompt": "hi", "callback_url": "ftp://x"}),
        400,
        "callback_url",
        "http:// or https://",
    )
    assert_error(api.http.post("/v1/jobs", content=b"{not json"), 422, None, "must be JSON")
    assert_error(api.http.get("/v1/jobs", params={"cursor": "garbage"}), 400, "cursor", "cursor")
    assert_error(api.http.get("/v1/jobs", params={"status": "done"}), 422, "status", "status")
    too_big = api.http.post("/v1/jobs", json={"prompt": "x" * MAX_BODY_BYTES})
    assert_error(too_big, 413, None, f"at most {MAX_BODY_BYTES} bytes")
    assert api.http.get("/v1/jobs").json()["data"] == []  # nothing was written


def test_idempotency_key_header(api: Api, client: object) -> None:
    request = {"prompt": "Once upon a time", "max_new_tokens": 2}
    first = api.http.post("/v1/jobs", json=request, headers={"Idempotency-Key": "k-1"})
    again = api.http.post("/v1/jobs", json=request, headers={"Idempotency-Key": "k-1"})
    assert first.json()["ids"] == again.json()["ids"]
    other = api.http.post(
        "/v1/jobs", json={**request, "prompt": "other"}, headers={"Idempotency-Key": "k-1"}
    )
    assert_error(other, 409, "idempotency_key", "used for a different request")
    job = api.http.get(f"/v1/jobs/{first.json()['ids'][0]}").json()
    assert job["idempotency_key"] == "k-1" and job["prompt"] == "Once upon a time"
    # truncate is part of the request: the same key with it is another request
    truncated = api.http.post(
        "/v1/jobs", json={**request, "truncate": True}, headers={"Idempotency-Key": "k-1"}
    )
    assert_error(truncated, 409, "idempotency_key", "used for a different request")
    # A list whose one reused key is refused queues none of its other requests
    mixed = [{"prompt": "queued with a refused one"}, {**request, "idempotency_key": "k-1", "n": 2}]
    assert_error(api.http.post("/v1/jobs", json=mixed), 409, "idempotency_key", "k-1")
    listed = api.http.get("/v1/jobs", params={"limit": 1000}).json()["data"]
    assert "queued with a refused one" not in [job["prompt"] for job in listed]


def test_native_truncate_is_shown_on_the_job(
    api: Api, client: object, reference: Reference
) -> None:
    # Given a prompt far longer than the tiny model's context of 512 tokens
    prompt = "Once upon a time " * 200
    long = {"prompt": prompt, "max_new_tokens": 4, "temperature": 0}
    cut = api.http.post("/v1/jobs", json={**long, "truncate": True}).json()["ids"][0]
    refused = api.http.post("/v1/jobs", json=long).json()["ids"][0]
    # Then the job that asked for truncation ran on its last 508 tokens and says what it dropped
    job = wait_job(api, cut)
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["truncate"] is True
    assert (job["prompt_tokens"], job["usage"]["prompt_tokens"]) == (508, 508)
    assert job["truncated_prompt_tokens"] == len(reference.encode(prompt)) - 508
    # And the other failed, pointing at truncate
    failed = wait_job(api, refused)
    assert failed["status"] == "failed" and failed["truncated_prompt_tokens"] is None
    assert "truncate: true would keep" in failed["error"]["message"]


def test_openai_completions_equal_direct_generate(
    api: Api, client: object, reference: Reference
) -> None:
    oai = api.openai()
    prompts = ["Once upon a time", "The queue takes a job and"]
    # When the official client asks for greedy completions of two prompts
    done = oai.completions.create(
        model=api.model, prompt=prompts, max_tokens=7, temperature=0, user="tester"
    )
    # Then each choice is what a direct generate gives, in OpenAI's shape
    assert done.object == "text_completion" and done.model == api.model
    expected = [reference.greedy(p, 7) for p in prompts]
    assert [c.text for c in done.choices] == [text for text, _ in expected]
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.finish_reason for c in done.choices] == [
        "length" if n == 7 else "stop" for _, n in expected
    ]
    assert done.usage is not None
    assert done.usage.completion_tokens == sum(n for _, n in expected)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # And n choices per prompt come back, numbered in order
    sampled = oai.completions.create(model=api.model, prompt="Hello", max_tokens=3, n=3, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2]


def test_openai_unsupported_and_invalid_parameters(api: Api, client: object) -> None:
    oai = api.openai()
    with pytest.raises(openai.BadRequestError) as echo:
        oai.completions.create(model=api.model, prompt="hi", echo=True)
    assert echo.value.body["param"] == "echo"  # type: ignore[index]
    assert "echo is not supported (only false or null)" in echo.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as logprobs:
        oai.completions.create(model=api.model, prompt="hi", logprobs=21)
    assert logprobs.value.body["param"] == "logprobs"  # type: ignore[index]
    assert "logprobs must be <= 20, got 21" in logprobs.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as tokens:
        oai.completions.create(model=api.model, prompt="hi", max_tokens=0)
    assert tokens.value.body["param"] == "max_tokens"  # type: ignore[index]
    assert "max_tokens must be >= 1, got 0" in tokens.value.body["message"]  # type: ignore[index]
    # vLLM's truncation extension is refused by name, pointing at the native API's truncate
    with pytest.raises(openai.BadRequestError) as truncate:
        oai.completions.create(
            model=api.model, prompt="hi", extra_body={"truncate_prompt_tokens": 100}
        )
    assert truncate.value.body["param"] == "truncate_prompt_tokens"  # type: ignore[index]
    assert "truncate: true" in truncate.value.body["message"]  # type: ignore[index]
    # neutral values ask for nothing we do not do: accepted
    ok = api.http.post(
        "/v1/completions",
        json={
            "prompt": "hi",
            "max_tokens": 1,
            "echo": False,
            "presence_penalty": 0,
            "logprobs": None,
        },
    )
    assert ok.status_code == 200, ok.text
    assert client.list() != []  # type: ignore[attr-defined]


def test_models_are_those_live_workers_serve(api: Api) -> None:
    oai = api.openai()
    models = oai.models.list()
    assert [m.id for m in models.data] == [api.model]
    # and each one by its id, which may hold a "/" (a Hugging Face id); another is not found
    assert oai.models.retrieve(api.model).id == api.model
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.models.retrieve("nobody/serves-this")
    assert unknown.value.code == "model_not_found"
    assert f"served now: {api.model}" in unknown.value.body["message"]  # type: ignore[index]


def test_openai_batch_roundtrip(api: Api, client: object, reference: Reference) -> None:
    oai = api.openai()
    prompts = ["Once upon a time", "The weather", "Dear team,"]
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": api.model, "prompt": p, "max_tokens": 5, "temperature": 0},
        }
        for i, p in enumerate(prompts)
    ]
    # one request that fails at run time: its prompt does not fit the model's context
    lines.append(
        {
            "custom_id": "too-long",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": api.model, "prompt": "word " * 600, "max_tokens": 5},
        }
    )
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = oai.files.create(file=("input.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    batch = oai.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 4  # type: ignore[union-attr]
    done = until(lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b)
    assert done.request_counts.completed == 3 and done.request_counts.failed == 1
    assert done.metadata == {"run": "test"}
    output = [json.loads(line) for line in oai.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == ["req-0", "req-1", "req-2"]
    for out, prompt in zip(output, prompts, strict=True):
        assert out["response"]["status_code"] == 200
        assert out["response"]["body"]["choices"][0]["text"] == reference.greedy(prompt, 5)[0]
    errors = [json.loads(line) for line in oai.files.content(done.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400
    too_long = errors[0]["response"]["body"]["error"]
    assert too_long["code"] == "context_length_exceeded"
    # in OpenAI's names, pointing at the route that truncates (the OpenAI ones refuse truncate)
    assert "max_tokens is 5" in too_long["message"] and "POST /v1/jobs" in too_long["message"]
    assert "max_new_tokens" not in too_long["message"] and "cq submit" not in too_long["message"]
    assert oai.files.content(uploaded.id).content == data
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(batch.id)


@pytest.mark.usefixtures("unserved_queue")
def test_batch_input_errors_and_cancel(api: Api, client: object) -> None:
    oai = api.openai()
    bad = oai.files.create(
        file=(
            "bad.jsonl",
            b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 5}}\n',
        ),
        purpose="batch",
    )
    with pytest.raises(openai.BadRequestError) as refused:
        oai.batches.create(
            input_file_id=bad.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert "line 1" in refused.value.body["message"] and "top_p" in refused.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")
    # A wrong purpose or an unknown input file: errors that name the field, as OpenAI's do
    with pytest.raises(openai.BadRequestError) as purpose:
        oai.files.create(file=("f.jsonl", b"{}"), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as no_file:
        oai.batches.create(
            input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h"
        )
    assert no_file.value.body["param"] == "input_file_id"  # type: ignore[index]
    # A batch for a model no worker serves waits; cancelling it cancels its jobs
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": NO_WORKER, "prompt": "x"},
    }
    waiting = oai.files.create(file=("w.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = oai.batches.create(
        input_file_id=waiting.id, endpoint="/v1/completions", completion_window="24h"
    )
    cancelled = oai.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts.failed == 1  # type: ignore[union-attr]
    assert cancelled.output_file_id is None and cancelled.error_file_id is not None
    error = json.loads(oai.files.content(cancelled.error_file_id).text)
    assert error["response"]["body"]["error"]["code"] == "cancelled"


def test_webhook_is_signed_retried_and_recorded(
    api: Api, client: object, hooks: tuple[HookServer, str]
) -> None:
    server, url = hooks
    # Given a job with a callback URL whose endpoint fails once, then accepts
    job_id = api.http.post(
        "/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 3, "callback_url": url}
    ).json()["ids"][0]
    # When the job ends, the API delivers it, retrying with backoff
    job = until(
        lambda: (
            (j := api.http.get(f"/v1/jobs/{job_id}").json())["webhook_status"] == "delivered" and j
        ),
        timeout_s=60,
    )
    # Then both attempts carried the job, signed with HMAC-SHA256 of the body
    assert job["webhook_attempts"] == 2 and job["webhook_delivered_at"]
    assert len(server.received) == 2
    for headers, body in server.received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-CQ-Signature"] == expected
        assert json.loads(body)["id"] == job_id and json.loads(body)["status"] == "succeeded"


@pytest.mark.usefixtures("unserved_queue")
def test_a_batch_past_its_window_expires_keeping_what_completed(
    api: Api, stack: Stack, reference: Reference
) -> None:
    oai = api.openai()
    # Given a batch with one request a worker runs and one for a model no worker serves
    lines = [
        {
            "custom_id": "served",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": api.model,
                "prompt": "The weather",
                "max_tokens": 4,
                "temperature": 0,
            },
        },
        {
            "custom_id": "unserved",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": NO_WORKER, "prompt": "x"},
        },
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = oai.files.create(file=("input.jsonl", data), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    until(lambda: oai.batches.retrieve(batch.id).request_counts.completed == 1)  # type: ignore[union-attr]
    # (its lines run in the batch lane, their deadline the end of its window)
    lines_jobs = stack.client().list(batch_id=batch.id)
    assert [job.lane for job in lines_jobs] == ["batch", "batch"]
    assert {int(job.deadline.timestamp()) for job in lines_jobs if job.deadline} == {
        batch.expires_at
    }
    # When its 24 h window has passed and a reaper pass runs (the window set back by hand: its
    # lines' deadline, and the batch's creation the expiry is shown from, 25 h ago)
    past = datetime.now(UTC) - timedelta(hours=25)
    with stack.client().sessions.begin() as session:
        session.execute(update(BatchRow).where(BatchRow.id == batch.id).values(created_at=past))
        session.execute(
            update(JobRow)
            .where(JobRow.batch_id == batch.id)
            .values(deadline=past + timedelta(hours=24))
        )
    assert oai.batches.retrieve(batch.id).status == "in_progress"
    env = {**os.environ, **worker_env(stack.settings)}
    reaped = subprocess.run(
        [sys.executable, "-m", "cli", "reap"], env=env, capture_output=True, text=True, timeout=60
    )
    assert reaped.returncode == 0, reaped.stderr
    # (the worker's own reaper, every CQ_REAP_INTERVAL_S = 15 s, may have taken it first)
    assert re.search(r"failed [01] queued job\(s\) past their deadline", reaped.stdout)
    # Then the batch is expired: the completed request is in the output file,
    expired = oai.batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.expired_at is not None
    assert expired.completed_at is None
    assert expired.request_counts.completed == 1 and expired.request_counts.failed == 1  # type: ignore[union-attr]
    assert expired.output_file_id is not None and expired.error_file_id is not None
    (output,) = [json.loads(x) for x in oai.files.content(expired.output_file_id).text.splitlines()]
    assert output["custom_id"] == "served"
    assert output["response"]["body"]["choices"][0]["text"] == reference.greedy("The weather", 4)[0]
    # and the other is in the error file as OpenAI writes expired requests
    (error,) = [json.loads(x) for x in oai.files.content(expired.error_file_id).text.splitlines()]
    assert error["custom_id"] == "unserved" and error["response"] is None
    assert error["error"]["code"] == "batch_expired"
    assert error["error"]["message"] == (
        "This request could not be executed before the completion window expired."
    )
    # and it cannot be cancelled any more
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(batch.id)


def test_each_api_path_stores_its_lane_and_post_jobs_takes_a_deadline(
    api: Api, client: CompletionClient
) -> None:
    # POST /v1/jobs: interactive by default, or the lane and deadline it names
    plain = api.http.post("/v1/jobs", json={"prompt": "x", "model": NO_WORKER})
    named = api.http.post(
        "/v1/jobs", json={"prompt": "x", "model": NO_WORKER, "lane": "batch", "deadline": 120}
    )
    plain_job = api.http.get(f"/v1/jobs/{plain.json()['ids'][0]}").json()
    named_job = api.http.get(f"/v1/jobs/{named.json()['ids'][0]}").json()
    assert (plain_job["lane"], plain_job["deadline"]) == ("interactive", None)
    assert named_job["lane"] == "batch"
    left = datetime.fromisoformat(named_job["deadline"]) - datetime.now(UTC)
    assert timedelta(seconds=100) < left <= timedelta(seconds=120)
    # and refuses a bad one, naming it, writing nothing
    before = len(client.list(limit=1000))
    bad_lane = api.http.post("/v1/jobs", json={"prompt": "x", "lane": "urgent"})
    assert_error(bad_lane, 400, "lane", "lane must be 'interactive' or 'batch'")
    bad_deadline = api.http.post("/v1/jobs", json={"prompt": "x", "deadline": "yesterday"})
    assert_error(bad_deadline, 400, "deadline", "deadline must be an ISO-8601 time")
    assert len(client.list(limit=1000)) == before
    # /v1/completions and /v1/chat/completions: interactive
    oai = api.openai()
    completion = oai.completions.create(model=api.model, prompt="Once", max_tokens=2)
    chat = oai.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    for answer in (completion.id, chat.id):
        job_id = answer.split("-", 1)[1]
        assert client.get(job_id).lane == "interactive"

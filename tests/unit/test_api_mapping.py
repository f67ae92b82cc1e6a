"""Pure pieces of the HTTP API: OpenAI parameter mapping, response shapes, cursors, signing."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pydantic
import pytest
from click.testing import CliRunner

from api.batch_output import ENDPOINT, parse_input
from api.errors import completion_error_info
from api.openai import completion_requests, in_openai_names
from api.routes.batches import BatchBody
from api.routes.jobs import decode_cursor, encode_cursor
from api.views import completion_view, job_failure
from api.webhooks import sign
from cli import cli
from completion_queue import QueueFull, ValidationError, is_loopback
from db import Choice, Job, JobStatus
from producer import Limits
from tests.factories import make_job


def job(status: JobStatus = JobStatus.SUCCEEDED, **overrides: object) -> Job:
    values: dict[str, object] = {
        "status": status,
        "choices": [Choice("a", "stop", 1), Choice("b", "length", 2)],
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "started_at": None,
    }
    return make_job("p", **{**values, **overrides})


def test_openai_parameters_map_to_one_request_per_prompt() -> None:
    body = {
        "model": "m",
        "prompt": ["a", "b"],
        "max_tokens": 5,
        "temperature": 0,
        "n": 2,
        "stop": ".",
        "seed": 1,
        "user": "u",
        "top_p": None,
    }
    assert completion_requests(body, max_prompts=10) == [
        {
            "prompt": p,
            "model": "m",
            "max_new_tokens": 5,
            "temperature": 0,
            "n": 2,
            "stop": ".",
            "seed": 1,
        }
        for p in ("a", "b")
    ]


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": False},
        {"echo": False},
        {"logprobs": None},
        {"presence_penalty": 0.0},
        {"frequency_penalty": 0},
        {"best_of": 1},
        {"logit_bias": {}},
        {"suffix": None},
    ],
)
def test_neutral_values_of_unsupported_parameters_are_accepted(extra: dict[str, object]) -> None:
    assert completion_requests({"prompt": "a", **extra}, max_prompts=1) == [{"prompt": "a"}]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": "a", "stream": True}, "stream", "stream is not supported (only false or null)"),
        ({"prompt": "a", "echo": True}, "echo", "echo is not supported"),
        ({"prompt": "a", "best_of": True}, "best_of", "best_of is not supported"),
        ({"prompt": "a", "tools": []}, "tools", "tools is not a supported parameter"),
        (
            {"prompt": "a", "truncate_prompt_tokens": 8},
            "truncate_prompt_tokens",
            "use POST /v1/jobs with truncate: true",
        ),
        ({"prompt": "a", "truncate": True}, "truncate", "use POST /v1/jobs with truncate: true"),
        ({"max_tokens": 3}, "prompt", "prompt is required"),
        ({"prompt": [1, 2]}, "prompt", "token ids are not supported"),
        ({"prompt": []}, "prompt", "non-empty list"),
        ({"prompt": ["a", "b", "c"]}, "prompt", "at most 2 prompts"),
        (["a"], "request", "JSON object"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(body: object, field: str, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        completion_requests(body, max_prompts=2)
    assert refused.value.field == field
    assert message in str(refused.value)


def test_errors_use_openai_names() -> None:
    ours = ValidationError(
        "requests[0]: max_new_tokens must be >= 1, got 0", field="max_new_tokens"
    )
    theirs = in_openai_names(ours)
    assert (str(theirs), theirs.field) == ("max_tokens must be >= 1, got 0", "max_tokens")


def test_completion_view_numbers_choices_prompt_by_prompt() -> None:
    jobs = [job(), job(choices=[Choice("c", "stop", 4)], prompt_tokens=2, completion_tokens=4)]
    view = completion_view(jobs, model="m")
    assert [(c["text"], c["index"]) for c in view["choices"]] == [("a", 0), ("b", 1), ("c", 2)]
    assert view["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert view["object"] == "text_completion" and view["id"] == f"cmpl-{jobs[0].id.hex}"
    assert all(c["logprobs"] is None for c in view["choices"])


def test_failed_jobs_map_to_status_codes() -> None:
    assert job_failure(job()) is None
    too_long = job(JobStatus.FAILED, error={"type": "ContextLengthExceeded", "message": "long"})
    info = job_failure(too_long)
    assert info is not None and (info.status, info.code) == (400, "context_length_exceeded")
    # in OpenAI's names, pointing at the route that truncates, not at the CLI
    worker_said = (
        "prompt has 600 tokens and max_new_tokens is 3: 603 exceeds the model's context of 512 "
        "tokens (truncate: true would keep the prompt's last 509 tokens; `cq submit --truncate`)"
    )
    said = job(JobStatus.FAILED, error={"type": "ContextLengthExceeded", "message": worker_said})
    info = job_failure(said)
    assert info is not None and info.message == (
        "prompt has 600 tokens and max_tokens is 3: 603 exceeds the model's context of 512 "
        "tokens (POST /v1/jobs with truncate: true keeps a too-long prompt's last tokens)"
    )
    assert info.param == "prompt"
    # a budget that fills the context alone names max_tokens
    budget = "prompt has 2 tokens and max_new_tokens is 600: ...; max_new_tokens must be below 512"
    alone = job_failure(
        job(JobStatus.FAILED, error={"type": "ContextLengthExceeded", "message": budget})
    )
    assert alone is not None and alone.param == "max_tokens"
    assert "max_tokens must be below 512" in alone.message
    crashed = job_failure(job(JobStatus.FAILED, error={"type": "ModelError", "message": "x"}))
    assert crashed is not None and crashed.status == 500 and crashed.type == "server_error"
    cancelled = job_failure(job(JobStatus.CANCELLED))
    assert cancelled is not None and cancelled.status == 409


def test_cursor_round_trips_and_refuses_garbage() -> None:
    j = job()
    assert decode_cursor(encode_cursor(j)) == (j.created_at, j.id)
    with pytest.raises(ValidationError, match="cursor"):
        decode_cursor("not-a-cursor")


def test_signature_is_hmac_sha256_of_the_body() -> None:
    expected = hmac.new(b"s", b"{}", hashlib.sha256).hexdigest()
    assert sign("s", b"{}") == f"sha256={expected}"


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "::1", "localhost", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.2", "example.com", "::"]))


def test_api_refuses_a_public_address_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CQ_API_KEYS", raising=False)
    result = CliRunner().invoke(cli, ["api", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to bind 0.0.0.0 without an API key" in result.output


def test_a_full_queue_is_a_429_in_openai_shape() -> None:
    info = completion_error_info(QueueFull("the queue holds 5 jobs and max_queued_jobs is 5"))
    assert info.status == 429
    body = info.body()["error"]
    assert body["code"] == "queue_full" and body["type"] == "rate_limit_error"
    assert "max_queued_jobs is 5" in body["message"]


def test_a_long_user_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError, match="user must be a string of at most 256") as info:
        completion_requests({"prompt": "a", "user": "u" * 257}, max_prompts=10)
    assert info.value.field == "user"


def batch_line(custom_id: str, prompt: object) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": 4}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body})


def test_batch_lines_end_at_newlines_only() -> None:
    # A JSON string may hold U+2028 (a line break to str.splitlines), escaped or not
    content = (batch_line("a", "one\u2028two") + "\n" + batch_line("b", "three") + "\r\n").encode()
    lines = parse_input(content, Limits(), max_requests=10)
    assert [(cid, [r["prompt"] for r in reqs]) for cid, reqs in lines] == [
        ("a", ["one\u2028two"]),
        ("b", ["three"]),
    ]


def test_a_batch_file_over_the_request_cap_is_refused_while_parsing() -> None:
    lines = [batch_line(f"id-{i}", ["p"] * 4) for i in range(100)]
    with pytest.raises(ValidationError, match="line 3: the file holds more than 10 requests"):
        parse_input("\n".join(lines).encode(), Limits(), max_requests=10)


def test_batch_metadata_is_bounded_as_openai_bounds_it() -> None:
    base = {"input_file_id": "file-1", "endpoint": ENDPOINT, "completion_window": "24h"}
    assert BatchBody(**base, metadata={"k": "v"}).metadata == {"k": "v"}
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k": "v" * 513}, {"k" * 65: "v"}):
        with pytest.raises(pydantic.ValidationError, match="metadata"):
            BatchBody(**base, metadata=metadata)


def test_a_completion_whose_client_went_away_cancels_its_jobs() -> None:
    import anyio

    from api.errors import APIError
    from api.openai import finished_completion

    job = make_job("a")
    cancelled: list[object] = []

    class Client:
        async def wait_async(self, jobs: object, timeout: float) -> object:
            await anyio.sleep(30)  # a long generation
            raise AssertionError("not cancelled")  # pragma: no cover

        def cancel(self, job_id: object) -> None:
            cancelled.append(job_id)

    class GoneRequest:
        async def is_disconnected(self) -> bool:
            return True

    async def call() -> None:
        with anyio.fail_after(5):
            await finished_completion(Client(), [job], 60, GoneRequest())  # type: ignore[arg-type]

    with pytest.raises(APIError) as info:
        anyio.run(call)
    assert info.value.info.status == 499 and cancelled == [job.id]


def test_a_job_past_its_deadline_answers_deadline_exceeded() -> None:
    late = job(JobStatus.FAILED, error={"type": "DeadlineExceeded", "message": "not started"})
    info = job_failure(late)
    assert info is not None and (info.status, info.code) == (408, "deadline_exceeded")
    line = job(JobStatus.FAILED, error={"type": "BatchExpired", "message": "window"})
    info = job_failure(line)
    assert info is not None and info.code == "batch_expired"

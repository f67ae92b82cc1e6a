"""Input the worker must refuse or survive: too long for the context, and fuzzed requests."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from completion_queue import ValidationError
from db import JobStatus
from producer.client import CompletionClient
from producer.schema import CompletionRequest, Limits, validate_request
from tests.conftest import Stack
from tests.integration.test_pipeline import PROMPTS
from tests.reference import Reference

SMALL = Limits(max_prompt_chars=200, max_new_tokens=24, max_n=2)

fuzzed = st.fixed_dictionaries(
    {"prompt": st.text(min_size=0, max_size=200)},
    optional={
        "max_new_tokens": st.one_of(st.integers(-5, 40), st.floats(), st.text(max_size=3)),
        "temperature": st.one_of(st.floats(), st.integers(-2, 3), st.none()),
        "top_p": st.one_of(st.floats(), st.integers(-1, 2)),
        "top_k": st.one_of(st.integers(-3, 100), st.booleans()),
        "repetition_penalty": st.one_of(st.floats(), st.integers(-1, 3)),
        "n": st.one_of(st.integers(-1, 4), st.text(max_size=2)),
        "stop": st.one_of(st.lists(st.text(max_size=4), max_size=6), st.text(max_size=4)),
        "seed": st.one_of(st.integers(-3, 2**64), st.floats()),
        "priority": st.integers(-2, 12),
        "truncate": st.one_of(st.booleans(), st.integers(0, 1), st.none()),
        "unknown": st.integers(),
    },
)


def test_a_prompt_longer_than_the_context_fails_with_a_clear_error(
    client: CompletionClient,
) -> None:
    # The tiny model's context is 512 tokens
    job = client.wait(client.submit("word " * 600, max_new_tokens=8), timeout=60)
    assert job.status is JobStatus.FAILED and job.choices == []
    assert job.error is not None and job.error["type"] == "ContextLengthExceeded"
    assert "exceeds the model's context of 512 tokens" in job.error["message"]
    assert "truncate: true would keep the prompt's last 504 tokens" in job.error["message"]
    assert job.truncated_prompt_tokens is None
    # and a prompt that fits, beside it, still runs
    fits = client.wait(client.submit("word " * 100, max_new_tokens=8), timeout=60)
    assert fits.status is JobStatus.SUCCEEDED


def test_a_too_long_prompt_asking_for_truncation_continues_its_last_tokens(
    client: CompletionClient, reference: Reference
) -> None:
    # Given a prompt of 756 tokens, more than the tiny model's context of 512 less 8 new
    # (its greedy text differs whether 503, 504 or 505 of its last tokens are kept)
    prompt = " ".join(PROMPTS * 8) + " Once upon a time"
    ids = reference.encode(prompt)
    assert len(ids) > 512 - 8
    # When it is submitted with truncate, and without it
    cut, refused = client.wait(
        client.submit_many(
            [
                {"prompt": prompt, "max_new_tokens": 8, "temperature": 0, "truncate": True},
                {"prompt": prompt, "max_new_tokens": 8, "temperature": 0},
            ]
        ),
        timeout=60,
    )
    # Then the first runs on its last 504 tokens, as a direct generate on them does
    assert cut.status is JobStatus.SUCCEEDED, cut.error
    assert cut.params["truncate"] is True
    assert cut.prompt_tokens == 512 - 8
    assert cut.truncated_prompt_tokens == len(ids) - (512 - 8)
    text, n_tokens = reference.greedy_ids(ids[-(512 - 8) :], 8)
    assert (cut.text, cut.completion_tokens) == (text, n_tokens)
    # and the second fails, saying what truncate would have done
    assert refused.status is JobStatus.FAILED and refused.error is not None
    assert refused.error["type"] == "ContextLengthExceeded"
    assert "truncate: true would keep the prompt's last 504 tokens" in refused.error["message"]


def test_truncation_cannot_make_room_for_max_new_tokens_beyond_the_context(
    client: CompletionClient,
) -> None:
    job = client.wait(
        client.submit("Once upon a time", max_new_tokens=600, truncate=True), timeout=60
    )
    assert job.status is JobStatus.FAILED and job.error is not None
    assert job.error["type"] == "ContextLengthExceeded"
    assert "max_new_tokens must be below 512" in job.error["message"]


def test_every_accepted_fuzzed_request_runs(stack: Stack, client: CompletionClient) -> None:
    accepted: list[CompletionRequest] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fuzzed)
    def collect(data: dict[str, Any]) -> None:
        try:
            accepted.append(validate_request(data, SMALL))
        except ValidationError as exc:
            assert exc.field, exc

    collect()
    # Given a sample of the requests validation accepted
    sample = accepted[:: max(1, len(accepted) // 40)][:40]
    assert len(sample) >= 10
    # When they all run through the real worker
    done = client.wait(client.submit_many(sample), timeout=180)
    # Then each one finished: succeeded, or failed with a clear, stored error
    for request, job in zip(sample, done, strict=True):
        assert job.status is JobStatus.SUCCEEDED, (request, job.error)
        assert len(job.choices) == request.n


def test_a_vanishing_temperature_samples_like_greedy(client: CompletionClient) -> None:
    # Found by the fuzz: 1e-45 overflowed the logits to inf and softmax to NaN
    tiny = {"max_new_tokens": 8, "temperature": 1.4e-45, "top_p": 1.4e-45, "seed": 3}
    job, greedy = client.wait(
        client.submit_many(
            [
                {"prompt": "Once upon a time", **tiny},
                {"prompt": "Once upon a time", "max_new_tokens": 8, "temperature": 0},
            ]
        ),
        timeout=60,
    )
    assert job.status is JobStatus.SUCCEEDED and job.text == greedy.text

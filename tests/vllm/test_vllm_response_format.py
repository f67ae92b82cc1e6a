"""``response_format`` jobs through the real pipeline on the vLLM engine: JSON of the same
language as on the static engine (compact separators, no free whitespace, properties in
the schema's order), made by vLLM's guidance backend from the static engine's grammar."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from db import Job, JobStatus
from producer.client import CompletionClient
from tests.schemas import PERSON, PERSON_FORMAT
from tests.vllm.conftest import offline_choice

pytestmark = pytest.mark.timeout(600)

PROMPT = "Question: what is the capital of France? Answer:"
#: A JSON string literal, escapes included.
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def free_whitespace(text: str) -> list[str]:
    """The whitespace outside string literals other than the separators ``", "`` and ``": "``."""
    skeleton = STRING.sub('""', text).replace(", ", ",").replace(": ", ":")
    return re.findall(r"\s", skeleton)


def test_json_schema_jobs_validate_in_the_static_engines_compact_form(
    vllm_client: CompletionClient, offline: Any
) -> None:
    # Given schema jobs, sampled with their own seeds and one greedy, and an unconstrained
    # greedy job in the same submit
    jobs = [
        {"prompt": PROMPT, "max_new_tokens": 96, "temperature": 1.0, "seed": seed}
        for seed in range(7)
    ] + [{"prompt": PROMPT, "max_new_tokens": 96, "temperature": 0}]
    plain = {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0}
    requests = [{**job, "response_format": PERSON_FORMAT} for job in jobs] + [plain]
    # When they run through the queue on the vLLM worker
    *constrained, free = vllm_client.wait(vllm_client.submit_many(requests), timeout=300)
    # Then each schema job ends on its own (EOS, not the token budget) with a document that
    # validates, its properties in the schema's order, and no whitespace but the separators
    for job in constrained:
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.choices[0].finish_reason == "stop", job.text
        document = json.loads(job.text)
        jsonschema.validate(document, PERSON)
        assert list(document) == list(PERSON["properties"])
        assert free_whitespace(job.text) == [], job.text
    # And the sampled documents differ: the grammar constrains, the seeds still choose
    assert len({job.text for job in constrained}) > 3
    # And the unconstrained batch-mate is what it is alone
    assert free.status is JobStatus.SUCCEEDED, free.error
    assert free.text == offline_choice(offline, plain["prompt"], 24, temperature=0).text


def test_json_object_jobs_are_objects_when_they_end_and_json_prefixes_when_cut(
    vllm_client: CompletionClient,
) -> None:
    # Given json_object jobs on several prompts, sampled and greedy
    prompts = ["Give JSON:", "Once upon a time", PROMPT, "{"]
    requests = [
        {
            "prompt": prompt,
            "max_new_tokens": 128,
            "temperature": temperature,
            "seed": 3,
            "response_format": {"type": "json_object"},
        }
        for prompt in prompts
        for temperature in (0, 1.0)
    ]
    # When they run through the queue on the vLLM worker
    done: list[Job] = vllm_client.wait(vllm_client.submit_many(requests), timeout=300)
    # Then a job that ended on its own holds one JSON object; one its budget cut holds the
    # start of one; neither has whitespace outside strings but the separators
    ended = 0
    for job in done:
        assert job.status is JobStatus.SUCCEEDED, job.error
        finish = job.choices[0].finish_reason
        if finish == "stop":
            assert isinstance(json.loads(job.text), dict), job.text
            assert free_whitespace(job.text) == [], job.text
            ended += 1
        else:
            assert finish == "length" and job.completion_tokens == 128
            assert job.text.startswith("{"), job.text
    assert ended >= 1, [job.text for job in done]

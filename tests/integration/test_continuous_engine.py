"""The continuous engine (transformers' continuous batching) on a real worker process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from completion_queue import EmbeddedRedis, WorkerProcess, worker_env
from db import JobStatus
from producer.client import CompletionClient
from tests.conftest import worker_settings
from tests.reference import Reference


@pytest.fixture(scope="module")
def continuous(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CompletionClient]:
    tmp = tmp_path_factory.mktemp("continuous")
    settings = worker_settings(
        request,
        redis_server.port,
        6,
        tiny_model,
        tmp,
        engine="continuous",
        batch_size=8,
        batch_lookahead=2,
        batch_wait_ms=20,
        max_new_tokens_limit=64,
    )
    worker = WorkerProcess(worker_env(settings), tmp / "worker.log").start().wait_ready(300)
    with CompletionClient(settings=settings) as client:
        yield client
    worker.stop()


@pytest.mark.timeout(600)
def test_greedy_jobs_equal_direct_generate(
    continuous: CompletionClient, reference: Reference
) -> None:
    requests = [
        {"prompt": p, "max_new_tokens": n, "temperature": 0, "stop": ["zzz-never"]}
        for p, n in [
            ("Once upon a time", 12),
            ("The queue takes a job and", 5),
            ("x", 20),
            ("Dear team, thank you", 9),
        ]
    ]
    done = continuous.wait(continuous.submit_many(requests), timeout=300)
    for request, job in zip(requests, done, strict=True):
        assert job.status is JobStatus.SUCCEEDED, job.error
        text, tokens = reference.greedy(str(request["prompt"]), int(request["max_new_tokens"]))
        assert (job.text, job.completion_tokens) == (text, tokens)


@pytest.mark.timeout(600)
def test_seeded_sampling_keeps_its_meaning(continuous: CompletionClient) -> None:
    seeded = {"prompt": "Once upon a time", "max_new_tokens": 10, "temperature": 0.9, "seed": 5}
    first, second = continuous.wait(
        [continuous.submit(**seeded), continuous.submit(**seeded)], timeout=300
    )
    assert first.status is JobStatus.SUCCEEDED and first.text == second.text

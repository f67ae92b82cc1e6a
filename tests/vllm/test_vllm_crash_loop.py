"""A job that kills its vLLM worker's model process every time fails alone, as on the static engine.

Each death ends the model process's ack-channel connection, so the main process
requeues what it held at once; the replacement loads vLLM anew (20 to 60 s here)
and runs the jobs again. After two crashes each job runs alone in the engine
(workers/isolation.py), so the crasher's later crashes take no batch-mate with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from completion_queue import EmbeddedRedis
from db import JobStatus
from tests.vllm.conftest import start_vllm_worker

pytestmark = pytest.mark.timeout(600)


def test_a_job_that_kills_its_model_process_every_time_fails_alone_after_max_attempts(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    # Given a vLLM worker whose model process dies on every step that holds a crashing prompt
    started = start_vllm_worker(
        request,
        redis_server.port,
        10,
        tiny_model,
        tmp_path,
        faults={"crash": "CRASH-PILL"},
        max_attempts=4,
    )
    client, worker = started.client, started.worker
    try:
        good = [
            {"prompt": f"good job {i}", "max_new_tokens": 8, "temperature": 0} for i in range(3)
        ]
        pill = {"prompt": "eat the CRASH-PILL", "max_new_tokens": 8, "temperature": 0}
        # When it is submitted with three good jobs
        done = client.wait(client.submit_many([*good[:2], pill, good[2]]), timeout=500)
        # Then it fails after CQ_MAX_ATTEMPTS claims, with the reason stored
        crasher = done.pop(2)
        assert crasher.status is JobStatus.FAILED and crasher.attempts == 4
        assert crasher.error is not None and crasher.error["type"] == "AttemptsExceeded"
        # and the good jobs succeed, each claimed at most three times (two crashes beside it)
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 3, [j.error for j in done]
        assert all(1 <= j.attempts <= 3 and j.completion_tokens for j in done)
        # and the worker, its model process replaced each time, goes on serving
        after = client.wait(client.submit("after", max_new_tokens=4), timeout=120)
        assert after.status is JobStatus.SUCCEEDED and after.attempts == 1
        assert worker.alive()
        assert worker.log_text().count("exited with 'signal 9 (SIGKILL)'") == 4
    finally:
        client.close()
        worker.stop()

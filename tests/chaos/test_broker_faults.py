"""Redis stops and starts again (append-only on) while jobs are queued and a batch runs."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api import create_api
from completion_queue import BrokerUnavailable, EmbeddedRedis
from db import BatchRow, JobStatus
from tests.chaos.conftest import Chaos, wait_for


def test_a_redis_restart_loses_no_job_and_refuses_producers_meanwhile(
    own_redis: Callable[..., EmbeddedRedis], chaos: Chaos
) -> None:
    server = own_redis(appendonly=True)
    chaos.use_broker(server.url)
    chaos.start_worker()
    with chaos.client() as client:
        # Given one batch running and another one's messages held by the worker
        jobs = client.submit_many(
            [{"prompt": f"story {i}", "max_new_tokens": 200, "temperature": 0} for i in range(16)]
        )
        wait_for(lambda: client.list(status="running"), 60, "the first batch to start")
        # When Redis stops
        server.stop()
        # Then a producer gets a clear error, and no row is left behind
        with pytest.raises(BrokerUnavailable, match="could not queue 1 job"):
            client.submit("while Redis is down", max_new_tokens=4)
        assert len(client.list(limit=100)) == 16
        # and a batch over HTTP is refused whole: no batch, no jobs
        with TestClient(create_api(chaos.settings), client=("127.0.0.1", 50000)) as http:
            line = {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": chaos.settings.model, "prompt": "x", "max_tokens": 2},
            }
            uploaded = http.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", json.dumps(line).encode())},
            )
            assert uploaded.status_code == 200, uploaded.text
            body = {
                "input_file_id": uploaded.json()["id"],
                "endpoint": "/v1/completions",
                "completion_window": "24h",
            }
            refused = http.post("/v1/batches", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        with client.sessions() as session:
            assert session.scalars(select(BatchRow)).all() == []
        assert len(client.list(limit=100)) == 16
        # and a job with an idempotency key is failed, its key freed for the retry
        with pytest.raises(BrokerUnavailable):
            client.submit("keyed", max_new_tokens=4, idempotency_key="k-down")
        (withdrawn,) = client.list(status="failed")
        assert withdrawn.error is not None and withdrawn.error["type"] == "BrokerUnavailable"
        # and when Redis is back, on the same port and data, every job completes once
        server.start()
        done = client.wait(jobs, timeout=240)
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 16
        assert all(len(j.choices) == 1 and j.attempts >= 1 for j in done)
        wait_for(lambda: chaos.queued_messages() + chaos.unacked_messages() == 0, 60, "drain")
        # and the worker serves new jobs, the keyed one retried under its key
        after = client.submit("after", max_new_tokens=4)
        keyed = client.submit("keyed", max_new_tokens=4, idempotency_key="k-down")
        assert keyed.id != withdrawn.id
        for job in client.wait([after, keyed], timeout=60):
            assert job.status is JobStatus.SUCCEEDED

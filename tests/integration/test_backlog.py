"""The backlog signal on real processes: jobs queued before any worker runs them, the
workers they call for, and nothing wanted once a real worker has run them; per tenant in
`cq stats`; the same numbers from `cq api` (/backlog, /metrics)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from completion_queue import (
    EmbeddedRedis,
    Settings,
    WorkerProcess,
    queue_name,
    worker_env,
)
from completion_queue.fair import ratio_key, ratios_key
from db import (
    JobRow,
    JobStatus,
    NewJob,
    create_jobs,
    make_engine,
    make_session_factory,
    upgrade,
)
from producer.backlog import model_backlogs, tenant_loads
from producer.client import CompletionClient
from tests.conftest import Stack, worker_settings
from tests.integration.test_api import start_api

#: A Redis db of its own (the stacks use 1 and 2, fair release 3 on, chaos 5, fair share 14).
REDIS_DB = 13
#: 40 characters: 10 estimated prompt tokens.
PROMPT = "The queue holds jobs for workers to run. "[:40]
NEW_TOKENS = 8


def cq_json(settings: Settings, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args, "--json"],
        env={**os.environ, **worker_env(settings)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def served_tokens(settings: Settings, tenant: str) -> int:
    engine = make_engine(settings.resolved_database_url())
    try:
        with make_session_factory(engine)() as session:
            rows = session.query(JobRow).filter(JobRow.tenant == tenant).all()
            return sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in rows)
    finally:
        engine.dispose()


@pytest.mark.timeout(300)
def test_backlog_counts_queued_jobs_until_a_worker_runs_them(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    # Given a fresh database and Redis db, and no worker yet
    settings = worker_settings(request, redis_server.port, REDIS_DB, tiny_model, tmp_path)
    redis.Redis(port=redis_server.port, db=REDIS_DB).flushdb()
    model = settings.model
    job = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    # When two tenants submit 12 and 4 jobs
    with CompletionClient(settings=settings) as client:
        acme = client.as_tenant("acme").submit_many([job] * 12)
        beta = client.as_tenant("beta").submit_many([job] * 4)
        # Then the signal counts all 16, at 10 prompt + 8 new tokens each (ratio 1 at first)
        before = cq_json(settings, "backlog")["models"][model]
        assert before == {
            "queued_jobs": 16,
            "queued_tokens": 16 * (10 + NEW_TOKENS),
            "running_jobs": 0,
            "workers": 0,
            "tokens_per_s_per_worker": settings.scale_worker_tokens_per_s,
            "measured": False,
            "desired_workers": 1,
        }
        # And `cq stats` shows each tenant's share of it, nothing served yet
        tenants = {t["tenant"]: t for t in cq_json(settings, "stats")["tenants"]}
        assert {name: (t["queued_jobs"], t["queued_tokens"]) for name, t in tenants.items()} == {
            "acme": (12, 12 * 18),
            "beta": (4, 4 * 18),
        }
        assert all(t["served_tokens"] == 0 for t in tenants.values())

        # When a worker starts and runs them
        worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start()
        try:
            worker.wait_ready()
            done = client.wait([j.id for j in acme + beta], timeout=120)
            assert all(j.status is JobStatus.SUCCEEDED for j in done)
            after = cq_json(settings, "backlog")["models"][model]
            stats = cq_json(settings, "stats")
        finally:
            worker.stop()
    # Then nothing is queued or wanted, and the worker's rate is measured from its rows
    assert (after["queued_jobs"], after["queued_tokens"], after["running_jobs"]) == (0, 0, 0)
    assert (after["workers"], after["measured"], after["desired_workers"]) == (1, True, 0)
    assert after["tokens_per_s_per_worker"] > 0
    # And each tenant was served its rows' prompt plus completion tokens, nothing left queued
    tenants = {t["tenant"]: t for t in stats["tenants"]}
    for name in ("acme", "beta"):
        assert tenants[name]["queued_jobs"] == 0
        assert tenants[name]["served_tokens"] == served_tokens(settings, name) > 0


def test_queued_tokens_are_estimated_by_each_tenants_own_ratio(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    # Given four queued jobs of acme and four of beta, each of 10 prompt and 100 new tokens
    settings = worker_settings(request, redis_server.port, REDIS_DB, tiny_model, tmp_path)
    client = redis.Redis(port=redis_server.port, db=REDIS_DB)
    client.flushdb()
    upgrade(settings.resolved_database_url())
    engine = make_engine(settings.resolved_database_url())
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        create_jobs(
            session,
            jobs=[
                NewJob(settings.model, "p", {}, tenant=name, cost=(10, 100))
                for name in ("acme", "beta")
                for _ in range(4)
            ],
        )
    # and acme's finished jobs generated a tenth of their most, everyone's a half (the
    # ratios the workers keep, written here as they leave them)
    queue = queue_name(settings.model)
    client.hset(ratios_key(queue), "acme", "0.1")
    client.set(ratio_key(queue), "0.5")
    try:
        with sessions() as session:
            tenants = {t.tenant: t for t in tenant_loads(session, client, window_s=60)}
            backlog = model_backlogs(settings, session, client)[settings.model]
    finally:
        engine.dispose()
        client.close()
    # Then acme's are counted at its own ratio, and beta's (none finished) at the model's
    assert (tenants["acme"].queued_tokens, tenants["beta"].queued_tokens) == (
        4 * (10 + 10),
        4 * (10 + 50),
    )
    assert backlog.queued_tokens == 4 * 20 + 4 * 60


def test_desired_workers_follow_the_drain_target(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    # Given 50 queued jobs of 18 estimated tokens (900), and no worker measured
    settings = worker_settings(
        request,
        redis_server.port,
        REDIS_DB,
        tiny_model,
        tmp_path,
        scale_worker_tokens_per_s=10.0,
        scale_drain_target_s=20.0,
    ).model_copy(update={"model": "backlog-unserved-model"})
    redis.Redis(port=redis_server.port, db=REDIS_DB).flushdb()
    with CompletionClient(settings=settings) as client:
        client.submit_many([{"prompt": PROMPT, "max_new_tokens": NEW_TOKENS}] * 50)
    # When the signal is read
    found = cq_json(settings, "backlog")["models"]["backlog-unserved-model"]
    # Then it asks for ceil(900 tokens / (10 tokens/s x 20 s)) = 5 workers
    assert found["queued_tokens"] == 900
    assert found["desired_workers"] == math.ceil(900 / (10.0 * 20.0)) == 5


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_api_serves_the_backlog_and_metrics_to_the_operator_only(
    stack: Stack, client: CompletionClient, tmp_path: Path
) -> None:
    # Given `cq api` with a tenant key and an operator key, and 3 jobs of an unserved model
    client.submit_many([{"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "model": "nobody"}] * 3)
    process, url = start_api(
        stack, tmp_path / "api.log", CQ_API_KEYS="tenant-key", CQ_OPERATOR_KEYS="op-key"
    )
    try:
        # When a loopback peer reads /backlog without a key
        every = httpx.get(f"{url}/backlog", timeout=30).json()
        flat = httpx.get(f"{url}/backlog/nobody", timeout=30).json()
        idle = httpx.get(f"{url}/backlog/no-such-model", timeout=30).json()
        metrics = httpx.get(f"{url}/metrics", timeout=30)
    finally:
        process.terminate()
        process.wait(30)
    # Then it gets every model's signal, and each model's flat, as KEDA reads it
    assert set(every) == {"models"}
    assert every["models"]["nobody"] == flat
    assert (flat["queued_jobs"], flat["queued_tokens"], flat["desired_workers"]) == (3, 54, 1)
    assert set(flat) == {
        "queued_jobs",
        "queued_tokens",
        "running_jobs",
        "workers",
        "tokens_per_s_per_worker",
        "measured",
        "desired_workers",
    }
    assert every["models"][stack.settings.model]["workers"] == 1
    assert (idle["queued_jobs"], idle["desired_workers"]) == (0, 0)
    # And the same numbers as Prometheus gauges, per model and per tenant
    assert metrics.status_code == 200
    gauges = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.text)
        for s in family.samples
    }
    assert gauges[("cq_backlog_queued_tokens", (("model", "nobody"),))] == 54
    assert gauges[("cq_backlog_desired_workers", (("model", "nobody"),))] == 1
    assert gauges[("cq_tenant_queued_jobs", (("model", "nobody"), ("tenant", "")))] == 3
    assert gauges[("cq_jobs_in_status", (("status", "queued"),))] == 3


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_remote_peer_needs_an_operator_key(stack: Stack) -> None:
    # Given the API app, called from a peer that is not loopback (the test client's "testclient")
    from api.app import create_api

    settings = stack.settings.model_copy(
        update={"api_keys": ["tenant-key"], "operator_keys": ["op-key"]}
    )
    with TestClient(create_api(settings)) as http:
        for path in ("/backlog", "/backlog/m", "/metrics"):
            # Then no key and a tenant's key are refused, and an operator key is let in
            assert http.get(path).status_code == 401
            refused = http.get(path, headers={"Authorization": "Bearer tenant-key"})
            assert refused.status_code == 401
            assert "CQ_OPERATOR_KEYS" in refused.json()["error"]["message"]
            ok = http.get(path, headers={"Authorization": "Bearer op-key"})
            assert ok.status_code == 200

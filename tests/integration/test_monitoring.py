"""Monitoring for real: Flower against the live worker, the worker's /metrics, cq stats/workers."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from completion_queue import free_port, lane_queue, prefetch_count, queue_name, worker_env
from db import JobStatus
from engine.devices import model_threads
from producer.client import CompletionClient
from tests.conftest import Stack, purge_queue
from tests.integration.test_cli import cq

T = TypeVar("T")
AUTH = "admin:s3cret"
UNSERVED = "unserved-stats-model"
SQLITE_ONLY = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def http_get(url: str, auth: str | None = AUTH) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def eventually(check: Callable[[], T | None], *, timeout_s: float = 30.0, what: str = "") -> T:
    """Return the first truthy result of ``check``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except (OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Return every sample of a Prometheus text page, by sample name."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


@pytest.fixture
def flower(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """`cq flower` for the stack, with basic auth and persistent state; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        **worker_env(stack.settings),
        "CQ_FLOWER_PORT": str(port),
        "CQ_FLOWER_BASIC_AUTH": AUTH,
        "CQ_FLOWER_DB": str(tmp_path / "flower.db"),
    }
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "flower"], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: http_get(url + "/healthcheck")[0] == 200, what="flower to start")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@SQLITE_ONLY
def test_flower_shows_the_worker_and_every_job(
    stack: Stack, client: CompletionClient, flower: str
) -> None:
    node = stack.worker.nodename
    # Given Flower sees the worker, with what it serves in its stats
    assert http_get(flower + "/api/workers", auth=None)[0] == 401
    assert http_get(flower + "/api/workers", auth="admin:wrong")[0] == 401

    def worker_entry() -> dict[str, Any] | None:
        status, body = http_get(flower + "/api/workers?refresh=1")
        return json.loads(body).get(node) if status == 200 else None

    entry = eventually(worker_entry, what="the worker in /api/workers")
    assert node.split("@")[0].endswith("-tiny-gpt2")  # the worker list names the model
    cq = entry["stats"]["cq"]
    assert cq["model"] == stack.settings.model
    assert cq["device"] == "cpu" and cq["dtype"] == "float32"
    assert (cq["batch_size"], cq["batch_wait_ms"]) == (16, 20)
    assert cq["prefetch"] == prefetch_count(stack.settings) == 2 * 16 * 8
    # When jobs run, one succeeding and one failing at run time
    jobs = client.submit_many([{"prompt": f"job {i}", "max_new_tokens": 3} for i in range(5)])
    too_long = client.submit("word " * 600, max_new_tokens=4)
    done = client.wait([*jobs, too_long], timeout=60)
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 5 + [JobStatus.FAILED]

    # Then Flower shows every job, each with its final state and its worker
    def tasks() -> dict[str, Any] | None:
        found = json.loads(http_get(flower + "/api/tasks")[1])
        final = {tid: t for tid, t in found.items() if t["state"] in ("SUCCESS", "FAILURE")}
        return found if len(final) >= 6 else None

    found = eventually(tasks, what="six finished tasks in /api/tasks")
    for job in done:
        task = found[str(job.id)]
        assert task["name"] == "cq.generate"
        assert task["worker"] == node
        assert task["state"] == ("SUCCESS" if job.status is JobStatus.SUCCEEDED else "FAILURE")
        assert task["received"] and task["started"]
    assert "ContextLengthExceeded" in found[str(too_long.id)]["exception"]
    # And its Prometheus page counts the events
    status, body = http_get(flower + "/metrics")
    assert status == 200
    events = {
        labels["type"]: value
        for labels, value in samples(body.decode())["flower_events_total"]
        if labels.get("worker") == node
    }
    assert events["task-succeeded"] >= 5 and events["task-failed"] >= 1
    assert events["task-received"] >= 6 and events["task-started"] >= 6


@SQLITE_ONLY
def test_flower_says_what_each_job_is(stack: Stack, client: CompletionClient, flower: str) -> None:
    # Given Flower's tasks page shows the kwargs column, where each job says what it is
    assert 'data-column="kwargs"' in http_get(flower + "/tasks")[1].decode()
    prompt = "Summarise this support ticket: the printer on the third floor jams on A3 paper"
    # When a tenant's job runs, submitted without task-sent events (the default)
    with CompletionClient(settings=stack.settings, tenant="acme") as acme:
        job = acme.submit(prompt, max_new_tokens=3)
        assert acme.wait(job, timeout=60).status is JobStatus.SUCCEEDED

    def info(job_id: object, state: str) -> dict[str, Any] | None:
        task = json.loads(http_get(f"{flower}/api/task/info/{job_id}")[1])
        return task if task.get("state") == state else None

    # Then the worker's task-received event gave Flower its model, prompt head,
    # max tokens and tenant
    task = eventually(lambda: info(job.id, "SUCCESS"), what="the job's task in Flower")
    assert task["name"] == "cq.generate" and task["worker"] == stack.worker.nodename
    assert ast.literal_eval(task["kwargs"]) == {
        "model": stack.settings.model,
        "prompt": prompt[:60],
        "max_new_tokens": 3,
        "tenant": "acme",
    }
    # When a producer with task-sent events queues a job for a model no worker serves
    sent_events = stack.settings.model_copy(update={"task_sent_events": True})
    with CompletionClient(settings=sent_events, tenant="acme") as producer:
        waiting = producer.submit("nobody serves this", model=UNSERVED, max_new_tokens=5)
    try:
        # Then Flower lists it, still pending, with its queue and what it is
        pending = eventually(lambda: info(waiting.id, "PENDING"), what="the unserved job")
        # (sent to acme's interactive lane queue for the model: see completion_queue.fair)
        lane = lane_queue(queue_name(UNSERVED), "acme", "interactive")
        assert pending["routing_key"] == lane and pending["worker"] is None
        assert ast.literal_eval(pending["kwargs"]) == {
            "model": UNSERVED,
            "prompt": "nobody serves this",
            "max_new_tokens": 5,
            "tenant": "acme",
        }
        # And Flower's search finds both jobs by tenant, and only the unserved one by model
        found = json.loads(http_get(flower + "/api/tasks?search=kwargs:tenant=acme")[1])
        assert set(found) == {str(job.id), str(waiting.id)}
        found = json.loads(http_get(f"{flower}/api/tasks?search=kwargs:model={UNSERVED}")[1])
        assert set(found) == {str(waiting.id)}
    finally:
        client.cancel(waiting)
        purge_queue(stack.redis, UNSERVED)


def test_worker_serves_prometheus_metrics(stack: Stack, client: CompletionClient) -> None:
    model = stack.settings.model
    url = f"http://127.0.0.1:{stack.settings.metrics_port}/metrics"
    before = samples(http_get(url, auth=None)[1].decode())

    def succeeded(found: dict[str, list[tuple[dict[str, str], float]]]) -> float:
        return sum(
            value
            for labels, value in found.get("cq_jobs_total", [])
            if labels == {"model": model, "status": "succeeded"}
        )

    jobs = client.wait(client.submit_many([{"prompt": "m", "max_new_tokens": 4}] * 8), timeout=60)
    assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}
    status, body = http_get(url, auth=None)
    assert status == 200
    after = samples(body.decode())
    assert succeeded(after) - succeeded(before) == 8
    for histogram in (
        "cq_generation_seconds",
        "cq_job_latency_seconds",
        "cq_request_queue_time_seconds",
        "cq_batch_size",
    ):
        assert any(labels.get("le") == "+Inf" for labels, _ in after[histogram + "_bucket"])
        assert after[histogram + "_count"][0][1] > 0
    assert after["cq_completion_tokens_total"][0][1] >= 32
    assert after["cq_tokens_per_second"][0][1] > 0
    [(load_labels, load_s)] = after["cq_model_load_seconds"]
    assert load_labels == {"model": model, "device": "cpu"} and load_s > 0
    [(queue_labels, depth)] = after["cq_queue_depth"]
    assert queue_labels["model"] == model and depth == 0
    [(info, _)] = after["cq_worker_info"]
    assert info["model"] == model and info["batch_size"] == "16"


@SQLITE_ONLY
def test_cq_workers_and_cq_stats(stack: Stack, client: CompletionClient) -> None:
    # Greedy: each job runs its 3 tokens (a sampled one might end at EOS sooner)
    jobs = client.submit_many(
        [{"prompt": f"s {i}", "max_new_tokens": 3, "temperature": 0} for i in range(6)]
    )
    client.wait(jobs, timeout=60)
    client.cancel(client.submit("never", model=UNSERVED))
    client.submit("waits", model=UNSERVED)
    try:
        check_workers_and_stats(stack)
    finally:
        purge_queue(stack.redis, UNSERVED)


def check_workers_and_stats(stack: Stack) -> None:
    # cq workers: the live worker, what it holds and what it did
    [worker] = json.loads(cq(stack, "workers", "--json").stdout)
    assert worker["hostname"] == stack.worker.nodename
    assert (worker["model"], worker["device"], worker["batch_size"]) == (
        stack.settings.model,
        "cpu",
        16,
    )
    # The engine it runs, on the torch threads CQ_TORCH_THREADS=0 gives it: all cores but one
    assert (worker["engine"], worker["threads"]) == ("static", model_threads())
    assert worker["jobs_done"] >= 6
    assert "cpu" in cq(stack, "workers").stdout
    assert cq(stack, "workers", "--hostname", "nobody@nowhere", check=False).returncode == 4
    # cq stats: statuses, recent throughput and latency, queue depths, workers
    stats = json.loads(cq(stack, "stats", "--json", "--window", "10m").stdout)
    assert stats["statuses"] == {
        "queued": 1,
        "running": 0,
        "succeeded": 6,
        "failed": 0,
        "cancelled": 1,
    }
    assert stats["finished"] == 6 and stats["window_s"] == 600
    assert stats["jobs_per_s"] == pytest.approx(6 / 600)
    assert stats["tokens_per_s"] == pytest.approx(18 / 600)
    latency = stats["latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] < 60
    # The cancelled job's message waits too, until a worker consumes and skips it
    assert stats["queues"] == {stack.settings.model: 0, UNSERVED: 2}
    assert [w["hostname"] for w in stats["workers"]] == [stack.worker.nodename]
    table = cq(stack, "stats").stdout
    assert "p50" in table and UNSERVED in table

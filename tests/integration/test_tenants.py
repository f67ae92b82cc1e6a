"""Tenants for real: keys made by `cq keys create`, a real `cq api`, worker and database.

Two tenants, alpha and beta, driven with httpx and the official `openai` client:
neither sees, cancels or downloads anything of the other's; a revoked key is
refused on its next request; usage adds up to the tokens in the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from api import create_api
from completion_queue import Settings, worker_env
from db import FileRow
from producer import CompletionClient
from tests.conftest import Stack, new_database, until
from tests.integration.test_api import assert_error, start_api


@dataclass
class Tenants:
    """A running `cq api` with no CQ_API_KEYS, and a client per tenant made by `cq keys`."""

    url: str
    model: str
    alpha: httpx.Client
    beta: httpx.Client
    keys: dict[str, str]

    def openai(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.keys[name], max_retries=0, timeout=120
        )


def finished(http: httpx.Client, job_id: str) -> dict[str, object]:
    """The job once it has finished, as its tenant reads it."""
    return until(
        lambda: (
            (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("queued", "running")
            and job
        )
    )


def cq(stack: Stack, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `cq ARGS` on the stack's database; with ``ok``, fail with its output when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**os.environ, **worker_env(stack.settings)},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 or not ok, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def tenants(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    keys = {}
    for name in ("alpha", "beta"):
        printed = cq(stack, "keys", "create", name).stdout.splitlines()
        keys[name] = printed[-1]  # the key, alone on the last line
    process, url = start_api(stack, tmp_path_factory.mktemp("tenants") / "api.log")
    http = {
        name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        for name, key in keys.items()
    }
    yield Tenants(url, stack.settings.model, http["alpha"], http["beta"], keys)
    for client in http.values():
        client.close()
    process.terminate()
    process.wait(30)
    for name in keys:  # later modules' APIs on this database run without keys
        cq(stack, "keys", "revoke", name, ok=False)  # some tests revoke theirs already


def test_keys_are_random_shown_once_and_never_listed(stack: Stack, tenants: Tenants) -> None:
    alpha, beta = tenants.keys["alpha"], tenants.keys["beta"]
    assert alpha.startswith("cq-") and len(alpha) >= 3 + 43 and alpha != beta  # 256 bits
    listed = cq(stack, "keys", "list", "--json").stdout
    names = {row["name"] for row in json.loads(listed)}
    assert {"alpha", "beta"} <= names
    assert alpha not in listed and beta not in listed and alpha[3:20] not in listed
    # Once keys exist, a request without one is refused, loopback or not
    assert_error(httpx.get(f"{tenants.url}/v1/jobs"), 401, None, "API key")


def test_a_tenant_sees_only_its_own_jobs_files_and_batches(tenants: Tenants) -> None:
    alpha, beta = tenants.alpha, tenants.beta
    # Given alpha's job, upload and batch
    posted = alpha.post("/v1/jobs", json={"prompt": "Once upon a time", "max_new_tokens": 2})
    job_id = posted.json()["ids"][0]
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": tenants.model, "prompt": "Hi", "max_tokens": 2},
    }
    upload = alpha.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode())},
    )
    file_id = upload.json()["id"]
    batch = alpha.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]
    assert finished(alpha, job_id)["tenant"] == "alpha"
    # Then beta gets 404 for each, exactly as for an id that does not exist
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("GET", f"/v1/batches/{batch_id}"),
        ("POST", f"/v1/batches/{batch_id}/cancel"),
    ]:
        theirs = beta.request(method, path)
        unknown = beta.request(
            method,
            path.replace(job_id, "0" * 8 + job_id[8:])
            .replace(file_id, file_id + "x")
            .replace(batch_id, batch_id + "x"),
        )
        assert theirs.status_code == unknown.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"]
    refused = beta.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert_error(refused, 404, "input_file_id", file_id)
    # and beta's listing holds none of alpha's jobs; alpha's holds them
    assert job_id not in [job["id"] for job in beta.get("/v1/jobs").json()["data"]]
    assert job_id in [job["id"] for job in alpha.get("/v1/jobs").json()["data"]]
    # and the official client sees the same
    with pytest.raises(openai.NotFoundError):
        tenants.openai("beta").files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        tenants.openai("beta").batches.retrieve(batch_id)
    assert tenants.openai("alpha").batches.retrieve(batch_id).id == batch_id


def test_idempotency_keys_are_per_tenant(tenants: Tenants) -> None:
    request = {"prompt": "Once upon a time", "max_new_tokens": 2}
    headers = {"Idempotency-Key": "order-1"}
    first = tenants.alpha.post("/v1/jobs", json=request, headers=headers).json()["ids"]
    # beta's same key, for another request, is beta's own: a new job, no 409
    other = tenants.beta.post("/v1/jobs", json={**request, "prompt": "Other"}, headers=headers)
    assert other.status_code == 202, other.text
    assert other.json()["ids"] != first
    again = tenants.alpha.post("/v1/jobs", json=request, headers=headers).json()["ids"]
    assert again == first


def test_python_client_of_a_tenant_sees_its_jobs_and_the_operator_sees_all(
    stack: Stack, tenants: Tenants
) -> None:
    posted = tenants.beta.post("/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 2})
    job_id = posted.json()["ids"][0]
    with CompletionClient(settings=stack.settings, tenant="alpha") as alpha:
        mine = alpha.submit("Dear team,", max_new_tokens=2)
        assert mine.tenant == "alpha"
        assert job_id not in [str(job.id) for job in alpha.list(limit=1000)]
    with CompletionClient(settings=stack.settings) as operator:
        seen = {str(job.id) for job in operator.list(limit=1000)}
        assert {job_id, str(mine.id)} <= seen
    assert finished(tenants.alpha, str(mine.id))["tenant"] == "alpha"


def test_usage_adds_up_to_the_tokens_in_the_rows(stack: Stack, tenants: Tenants) -> None:
    answer = tenants.openai("beta").completions.create(
        model=tenants.model, prompt=["Once upon a time", "The weather"], max_tokens=3
    )
    assert answer.usage is not None
    rows = tenants.beta.get("/v1/jobs", params={"limit": 1000}).json()["data"]
    finished = [row for row in rows if row["status"] == "succeeded"]
    until(lambda: tenants.beta.get("/v1/usage").json()["data"], timeout_s=10)
    data = tenants.beta.get("/v1/usage").json()["data"]
    assert {row["tenant"] for row in data} == {"beta"}
    assert sum(row["prompt_tokens"] for row in data) == sum(
        row["prompt_tokens"] for row in finished
    )
    assert sum(row["completion_tokens"] for row in data) == sum(
        row["completion_tokens"] for row in finished
    )
    printed = json.loads(cq(stack, "usage", "--tenant", "beta", "--json").stdout)
    assert sum(row["completion_tokens"] for row in printed) == sum(
        row["completion_tokens"] for row in data
    )


def test_a_revoked_key_is_refused_on_its_next_request(stack: Stack, tenants: Tenants) -> None:
    cq(stack, "keys", "create", "gamma")
    key = cq(stack, "keys", "create", "delta").stdout.splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{tenants.url}/v1/jobs", headers=headers).status_code == 200
    cq(stack, "keys", "revoke", "delta")
    assert_error(httpx.get(f"{tenants.url}/v1/jobs", headers=headers), 401, None, "API key")
    cq(stack, "keys", "revoke", "gamma")


def test_cq_keys_refuses_a_taken_name_and_a_bad_one(stack: Stack, tenants: Tenants) -> None:
    for args, says in [(("alpha",), "exists already"), (("no spaces",), "NAME must be")]:
        done = cq(stack, "keys", "create", *args, ok=False)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_without_any_key_the_api_answers_loopback_peers_only(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    settings = Settings(database_url=new_database("sqlite", request, tmp_path))
    app = create_api(settings)
    # Given no key anywhere: a loopback peer is served without auth
    with TestClient(app, client=("127.0.0.1", 40000)) as local:
        assert local.get("/v1/jobs").status_code == 200
        # as the openai clients are, which always send a bearer (api_key="EMPTY")
        empty = {"Authorization": "Bearer EMPTY"}
        assert local.get("/v1/jobs", headers=empty).status_code == 200
    # and a peer from elsewhere (an API bound to 0.0.0.0 whose keys were all revoked) is not
    with TestClient(app, client=("10.1.2.3", 40000)) as remote:
        assert_error(remote.get("/v1/jobs"), 401, None, "cq keys create")
    # and once CQ_API_KEYS names one, `name:key` is tenant "name", a bare key its own tenant
    keyed = create_api(settings.model_copy(update={"api_keys": ["ops:k-1", "k-2"]}))
    with TestClient(keyed, client=("127.0.0.1", 40000)) as local:
        assert_error(local.get("/v1/jobs"), 401, None, "API key")
        posted = local.post(
            "/v1/files",
            headers={"Authorization": "Bearer k-1"},
            data={"purpose": "batch"},
            files={"file": ("a.jsonl", b"{}")},
        )
        file_id = posted.json()["id"]
        other = local.get(f"/v1/files/{file_id}", headers={"Authorization": "Bearer k-2"})
        assert other.status_code == 404
        mine = local.get("/v1/usage", headers={"Authorization": "Bearer k-1"}).json()
        assert mine["object"] == "list"
    with CompletionClient(settings=settings) as operator, operator.sessions() as session:
        assert session.get(FileRow, file_id).tenant == "ops"  # type: ignore[union-attr]


def test_each_quota_refuses_without_writing_and_touches_no_other_tenant(
    stack: Stack, tenants: Tenants
) -> None:
    idle = "tenant-test-no-worker"  # a model no worker serves: its jobs stay queued
    models = f"{tenants.model},{idle}"
    key = cq(stack, "keys", "create", "capped", "--models", models, "--max-queued", "2")
    capped = httpx.Client(
        base_url=tenants.url,
        timeout=120,
        headers={"Authorization": f"Bearer {key.stdout.splitlines()[-1]}"},
    )
    listed = {row["name"]: row for row in json.loads(cq(stack, "keys", "list", "--json").stdout)}
    assert listed["capped"]["models"] == [tenants.model, idle]
    assert listed["capped"]["max_queued"] == 2
    # A model outside its list: 404 model_not_found naming the ones it may use, nothing written
    other = capped.post("/v1/jobs", json={"prompt": "Hi", "model": "gpt-4"})
    assert_error(other, 404, "model", "you may use: " + models.replace(",", ", "))
    assert other.json()["error"]["code"] == "model_not_found"
    assert capped.get("/v1/jobs").json()["data"] == []
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(
            base_url=f"{tenants.url}/v1", api_key=key.stdout.splitlines()[-1], max_retries=0
        ).completions.create(model="gpt-4", prompt="Hi")
    # Its queue: two queued jobs fit, a third is 429 naming the limit, and nothing is written
    ids = capped.post(
        "/v1/jobs", json=[{"prompt": "a", "model": idle}, {"prompt": "b", "model": idle}]
    ).json()["ids"]
    full = capped.post("/v1/jobs", json={"prompt": "c", "model": idle})
    assert_error(full, 429, None, "may have 2 (its --max-queued)")
    assert len(capped.get("/v1/jobs").json()["data"]) == 2
    # while beta, with no quota, queues on the same model
    assert tenants.beta.post("/v1/jobs", json={"prompt": "c", "model": idle}).status_code == 202
    for job_id in ids:
        capped.post(f"/v1/jobs/{job_id}/cancel")
    assert capped.post("/v1/jobs", json={"prompt": "c", "model": idle}).status_code == 202
    capped.close()
    cq(stack, "keys", "revoke", "capped")


def test_submits_at_once_never_pass_a_tenant_s_max_queued(stack: Stack, tenants: Tenants) -> None:
    idle = "tenant-test-no-worker"  # a model no worker serves: its jobs stay queued
    key = cq(stack, "keys", "create", "racer", "--models", idle, "--max-queued", "3")
    headers = {"Authorization": f"Bearer {key.stdout.splitlines()[-1]}"}
    # Given a tenant that may have 3 jobs queued
    with httpx.Client(base_url=tenants.url, headers=headers, timeout=120) as racer:

        def post(i: int) -> int:
            return racer.post("/v1/jobs", json={"prompt": f"race {i}", "model": idle}).status_code

        # When 24 submits arrive at once
        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(post, range(24)))
        # Then exactly 3 are queued and the rest refused: none counted before another wrote
        listed = racer.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert sorted(codes) == [202] * 3 + [429] * 21
        assert len(listed) == 3
        for job in listed:
            racer.post(f"/v1/jobs/{job['id']}/cancel")
    cq(stack, "keys", "revoke", "racer")


def test_a_tenant_over_its_rate_gets_429_with_retry_after(stack: Stack, tenants: Tenants) -> None:
    key = cq(stack, "keys", "create", "throttled", "--rate", "2").stdout.splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=tenants.url, headers=headers, timeout=30) as throttled:
        codes = [throttled.get("/v1/usage") for _ in range(8)]
    refused = [r for r in codes if r.status_code == 429]
    assert refused and [r.status_code for r in codes].count(200) >= 2
    assert_error(refused[0], 429, None, "2 requests per second (its --rate)")
    assert 1 <= int(refused[0].headers["Retry-After"]) <= 1
    # beta, meanwhile, is not limited
    assert all(tenants.beta.get("/v1/usage").status_code == 200 for _ in range(8))
    cq(stack, "keys", "revoke", "throttled")


def test_a_tenants_weight_is_set_listed_and_changed(stack: Stack) -> None:
    # Given a tenant created with a weight, and one with the default
    cq(stack, "keys", "create", "heavy", "--weight", "2.5")
    cq(stack, "keys", "create", "plain")

    def weights() -> dict[str, float]:
        listed = json.loads(cq(stack, "keys", "list", "--json").stdout)
        return {row["name"]: row["weight"] for row in listed}

    assert {"heavy": 2.5, "plain": 1.0}.items() <= weights().items()
    assert "weight" in cq(stack, "keys", "list").stdout
    # When its weight is changed
    cq(stack, "keys", "set-weight", "heavy", "0.5")
    # Then the list shows the new one; bad weights and unknown names are refused
    assert weights()["heavy"] == 0.5
    for args in (("create", "w0", "--weight", "0"), ("create", "w1", "--weight", "nan")):
        done = cq(stack, "keys", *args, ok=False)
        assert done.returncode == 2 and "'--weight'" in done.stderr, done.stderr
    done = cq(stack, "keys", "set-weight", "heavy", "-1", ok=False)
    assert done.returncode == 2 and "WEIGHT" in done.stderr, done.stderr
    done = cq(stack, "keys", "set-weight", "nobody", "2", ok=False)
    assert done.returncode == 2 and "no live tenant named 'nobody'" in done.stderr
    assert "w0" not in weights() and "w1" not in weights()
    for name in ("heavy", "plain"):
        cq(stack, "keys", "revoke", name)

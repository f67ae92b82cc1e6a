"""The CLI as scripts use it: each documented exit code from the case it names, short ids,
the warning for a model nobody serves (and the presence it reads), and words where a
table would be empty."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import redis

from cli.group import ExitCode
from completion_queue import (
    EmbeddedRedis,
    announce,
    free_port,
    served_models,
    withdraw,
)
from completion_queue.presence import WORKERS_KEY
from db import NewJob, create_jobs
from producer.client import CompletionClient
from tests.conftest import Stack, purge_queue
from tests.integration.test_cli import cq

UNSERVED = "cli-test-unserved-model"
TOO_LONG = "Once upon a time " * 200  # 1,000 tokens: past the tiny model's context of 512


def test_each_exit_code_comes_from_the_case_it_names(
    stack: Stack, client: CompletionClient, tmp_path: Path
) -> None:
    # 0: a job waited for succeeded
    ok = cq(stack, "submit", "hi", "--max-new-tokens", "2", "--wait", check=False)
    assert ok.returncode == ExitCode.OK, ok.stderr
    # 1: a job waited for failed; `cq wait` on it says the same
    failed = cq(stack, "submit", TOO_LONG, "--max-new-tokens", "4", "--wait", check=False)
    assert failed.returncode == ExitCode.JOB_FAILED, failed.stderr
    job = json.loads(failed.stdout)
    assert job["status"] == "failed" and "cq submit --truncate" in job["error"]["message"]
    assert cq(stack, "wait", job["id"], check=False).returncode == ExitCode.JOB_FAILED
    # 2: invalid input, named
    bad = cq(stack, "submit", "hi", "--top-p", "2", check=False)
    assert bad.returncode == ExitCode.USAGE and "top_p must be <= 1" in bad.stderr
    # 3: a wait timed out, and the id waited for is printed
    try:
        late = cq(stack, "submit", "x", "--model", UNSERVED, "--wait", "0.5", check=False)
        assert late.returncode == ExitCode.TIMED_OUT, late.stderr
        (queued,) = client.list(status="queued")
        assert str(queued.id) in late.stderr
    finally:
        purge_queue(stack.redis, UNSERVED)
    # 4: no such job, no such batch
    assert cq(stack, "status", str(uuid.UUID(int=0)), check=False).returncode == ExitCode.NOT_FOUND
    missing = cq(
        stack, "results", "--batch", "no-such-batch", "--out", str(tmp_path / "o"), check=False
    )
    assert missing.returncode == ExitCode.NOT_FOUND and "no-such-batch" in missing.stderr
    # 5: the broker, or the database, cannot be reached: one line, no traceback
    closed = f"redis://127.0.0.1:{free_port()}/0"
    for args, env in (
        (("submit", "hi"), {"CQ_BROKER_URL": closed}),
        (("list",), {"CQ_DATABASE_URL": f"postgresql+psycopg://cq@127.0.0.1:{free_port()}/cq"}),
    ):
        down = cq(stack, *args, check=False, **env)
        assert down.returncode == ExitCode.UNREACHABLE, down.stderr
        assert down.stderr.startswith("error: ") and "Traceback" not in down.stderr
        assert len(down.stderr.strip().splitlines()) == 1
    # 6: refused: cancelling a job that already finished leaves it as it is
    finished = json.loads(ok.stdout)
    refused = cq(stack, "cancel", finished["id"], check=False)
    assert refused.returncode == ExitCode.REFUSED and "already succeeded" in refused.stderr
    assert json.loads(refused.stdout)["status"] == "succeeded"


def test_bad_options_and_paths_are_usage_errors_not_tracebacks(
    stack: Stack, client: CompletionClient, tmp_path: Path
) -> None:
    batch = cq(stack, "submit", "--file", str(_one_line(tmp_path))).stdout.split("batch id: ")[1]
    for args, named in (
        (("stats", "--window", "0s"), "--window"),
        (("results", "--batch", batch.strip(), "--out", str(tmp_path / "no" / "x.jsonl")), "--out"),
        (("model", "make-tiny", "/proc/cq-no-such-dir"), "DIRECTORY"),
    ):
        done = cq(stack, *args, check=False)
        assert done.returncode == ExitCode.USAGE, done.stderr
        assert named in done.stderr and "Traceback" not in done.stderr


def _one_line(tmp_path: Path) -> Path:
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "hi", "max_new_tokens": 1}\n')
    return path


def test_a_short_id_names_a_job_everywhere(stack: Stack, client: CompletionClient) -> None:
    # Given two queued jobs whose ids share their first 4 digits, and one that ran
    twins = [uuid.UUID("abcd0000" + "0" * 24), uuid.UUID("abcd1111" + "0" * 24)]
    with client.sessions.begin() as session:
        create_jobs(
            session, jobs=[NewJob(model=UNSERVED, prompt="p", params={}, id=i) for i in twins]
        )
    ran = json.loads(cq(stack, "submit", "hi", "--max-new-tokens", "2", "--wait").stdout)
    # When each command gets 8 characters, as `cq list` shows them
    listed = cq(stack, "list").stdout
    short = ran["id"][:8]
    assert short in listed and "abcd0000" in listed and UNSERVED in listed
    # Then status and wait find the job; cancel finds a twin by its longer prefix
    assert json.loads(cq(stack, "status", short).stdout)["id"] == ran["id"]
    assert json.loads(cq(stack, "wait", short).stdout)["status"] == "succeeded"
    cancelled = json.loads(cq(stack, "cancel", "abcd1111").stdout)
    assert (cancelled["id"], cancelled["status"]) == (str(twins[1]), "cancelled")
    # And a prefix of both is refused as ambiguous, one of neither as not found
    both = cq(stack, "status", "abcd", check=False)
    assert both.returncode == ExitCode.USAGE and "ambiguous" in both.stderr
    assert cq(stack, "status", "abce", check=False).returncode == ExitCode.NOT_FOUND
    assert cq(stack, "status", "xyz!", check=False).returncode == ExitCode.USAGE
    # And `cq list --json` gives the full rows
    rows = [json.loads(line) for line in cq(stack, "list", "--json").stdout.splitlines()]
    assert {row["id"] for row in rows} == {ran["id"], *map(str, twins)}
    assert {row["model"] for row in rows} == {UNSERVED, stack.settings.model}


def test_a_model_nobody_serves_is_warned_about(stack: Stack, client: CompletionClient) -> None:
    try:
        # When a job asks for a model no live worker serves
        unserved = cq(stack, "submit", "x", "--model", UNSERVED)
        # Then it still queues, and the CLI says why it may wait
        assert json.loads(unserved.stdout)["status"] == "queued"
        assert f"no live worker serves model {UNSERVED!r}" in unserved.stderr
    finally:
        purge_queue(stack.redis, UNSERVED)
    # And a job for the served model gets no warning
    assert "warning" not in cq(stack, "submit", "x", "--max-new-tokens", "1").stderr


def test_empty_things_are_said_in_words(
    stack: Stack, client: CompletionClient, tmp_path: Path
) -> None:
    assert cq(stack, "list").stdout.strip() == "no jobs yet: cq submit 'Hello'"
    assert cq(stack, "list", "--status", "failed").stdout.strip() == "no jobs match"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    refused = cq(stack, "submit", "--file", str(empty), check=False)
    assert refused.returncode == ExitCode.USAGE and "holds no requests" in refused.stderr
    # A bad request is named by its line in the file, counted from 1 as the JSON errors are
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"prompt": "fine"}\n\n{"prompt": "x", "top_p": 2}\n')
    bad = cq(stack, "submit", "--file", str(lines), check=False)
    assert bad.returncode == ExitCode.USAGE and "line 3: top_p must be <= 1" in bad.stderr
    assert client.list() == []


def test_a_worker_counts_as_serving_for_three_heartbeats(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis(port=redis_server.port, db=9)
    try:
        # Given two workers that announce their model, one with a heartbeat of 0.1 s
        announce(client, "slow@host", "m", heartbeat_s=60)
        announce(client, "fast@host", "m", heartbeat_s=0.1)
        client.hset(WORKERS_KEY, "garbage@host", "not json")
        assert served_models(client) == {"m": 2}
        # When the fast one misses three heartbeats, and the slow one stops
        time.sleep(0.4)
        assert served_models(client) == {"m": 1}
        withdraw(client, "slow@host")
        # Then no one serves m, and the unreadable entry is gone
        assert served_models(client) == {}
        assert client.hkeys(WORKERS_KEY) == [b"fast@host"]
    finally:
        client.flushdb()
        client.close()

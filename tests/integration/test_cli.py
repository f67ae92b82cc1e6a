"""The cq command line, run as a user runs it, against the live stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import cli
from completion_queue import worker_env
from tests.conftest import Stack


def cq(
    stack: Stack, *args: str, check: bool = True, **env_: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **worker_env(stack.settings), **env_}
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_every_command_has_help() -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    names = [[]] + [[name] for name in cli.commands] + [["db", "upgrade"], ["model", "make-tiny"]]
    for name in names:
        result = runner.invoke(cli, [*name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output


def test_submit_wait_status_list_cancel(stack: Stack, client: object) -> None:
    done = json.loads(
        cq(
            stack,
            "submit",
            "Once upon a time",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--wait",
        ).stdout
    )
    assert done["status"] == "succeeded" and done["completion_tokens"] == 5
    status = json.loads(cq(stack, "status", done["id"]).stdout)
    assert status["choices"] == done["choices"]
    assert done["id"][:8] in cq(stack, "list", "--status", "succeeded").stdout
    cancelled = cq(stack, "cancel", done["id"], check=False)
    assert json.loads(cancelled.stdout)["status"] == "succeeded"  # finished jobs stay as they are
    assert cancelled.returncode == 6 and "already succeeded" in cancelled.stderr


def test_submit_truncate_keeps_a_too_long_prompt_running(stack: Stack, client: object) -> None:
    # 1,000 tokens against the tiny model's context of 512
    long = "Once upon a time " * 200
    done = json.loads(
        cq(stack, "submit", long, "--max-new-tokens", "4", "--truncate", "--wait").stdout
    )
    assert done["status"] == "succeeded", done["error"]
    assert done["prompt_tokens"] == 508 and done["truncated_prompt_tokens"] > 0
    refused = cq(stack, "submit", long, "--max-new-tokens", "4", "--wait", check=False)
    assert refused.returncode == 1
    error = json.loads(refused.stdout)["error"]["message"]
    assert "truncate: true" in error and "--truncate" in error


def test_bad_parameter_is_refused_with_its_name(stack: Stack, client: object) -> None:
    done = cq(stack, "submit", "hi", "--top-p", "2", check=False)
    assert done.returncode == 2
    assert "top_p must be <= 1, got 2.0" in done.stderr


def test_submit_file_then_results(stack: Stack, client: object, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(json.dumps({"prompt": f"line {i}", "max_new_tokens": 3}) + "\n" for i in range(5))
    )
    out = cq(stack, "submit", "--file", str(jobs), "--wait", "60").stdout
    batch = out.split("batch id: ")[1].split()[0]
    results = tmp_path / "out.jsonl"
    assert "wrote 5 jobs" in cq(stack, "results", "--batch", batch, "--out", str(results)).stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"line {i}" for i in range(5)]
    assert {r["status"] for r in rows} == {"succeeded"}


def test_a_file_resubmitted_under_one_key_gives_back_its_batch(
    stack: Stack, client: object, tmp_path: Path
) -> None:
    # Given a file of three requests, submitted under one --idempotency-key
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"line {i}"}) + "\n" for i in range(3)))
    first = cq(stack, "submit", "--file", str(jobs), "--idempotency-key", "nightly-7")
    # When the same command runs again (a retried cron job)
    again = cq(stack, "submit", "--file", str(jobs), "--idempotency-key", "nightly-7")
    # Then it names the same batch and queues nothing more: line i holds the key KEY:i
    assert again.stdout == first.stdout
    assert first.stdout.startswith("submitted 3 jobs; batch id: ")
    listed = client.list()  # type: ignore[attr-defined]
    assert sorted(j.idempotency_key for j in listed) == [f"nightly-7:{i}" for i in range(3)]
    # and stdout holds that one line, for scripts: the progress bars go to stderr
    assert len(first.stdout.splitlines()) == 1


@pytest.mark.parametrize("line", ['{"prompt": ""}', "not json"])
def test_bad_file_line_writes_nothing(
    stack: Stack, client: object, tmp_path: Path, line: str
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "fine"}\n' + line + "\n")
    done = cq(stack, "submit", "--file", str(jobs), check=False)
    assert done.returncode == 2
    assert "prompt" in done.stderr or "line 2" in done.stderr
    assert client.list() == []  # type: ignore[attr-defined]


def test_a_file_line_that_is_not_utf8_writes_nothing(
    stack: Stack, client: object, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    done = cq(stack, "submit", "--file", str(jobs), check=False)
    assert done.returncode == 2, done.stderr
    assert "line 2 is not valid UTF-8" in done.stderr
    assert client.list() == []  # type: ignore[attr-defined]


def test_submit_a_chat_with_a_schema_and_logprobs(
    stack: Stack, client: object, tmp_path: Path
) -> None:
    schema = tmp_path / "person.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"age": {"type": "integer", "maximum": 99}},
                "required": ["age"],
                "additionalProperties": False,
            }
        )
    )
    # When a chat job is submitted from the command line
    done = json.loads(
        cq(
            stack,
            "submit",
            "--system",
            "Be brief.",
            "--user",
            "How old?",
            "--json-schema",
            str(schema),
            "--logprobs",
            "2",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
            "--wait",
        ).stdout
    )
    # Then the row holds the messages, and the reply is JSON of that schema, with logprobs
    assert done["status"] == "succeeded", done["error"]
    assert done["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How old?"},
    ]
    assert set(json.loads(done["choices"][0]["text"])) == {"age"}
    assert done["params"]["response_format"]["json_schema"]["name"] == "person"
    entries = done["choices"][0]["logprobs"]
    assert len(entries) == done["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    # And a JSONL line may hold messages; --system without --user is a usage error
    lines = tmp_path / "chat.jsonl"
    lines.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 3}) + "\n"
    )
    out = cq(stack, "submit", "--file", str(lines), "--wait", "60").stdout
    results = tmp_path / "out.jsonl"
    cq(stack, "results", "--batch", out.split("batch id: ")[1].split()[0], "--out", str(results))
    row = json.loads(results.read_text())
    assert row["status"] == "succeeded" and row["messages"][0]["content"] == "Hi"
    usage = cq(stack, "submit", "--system", "Be brief.", check=False)
    assert usage.returncode == 2 and "--system needs --user" in usage.stderr

"""``cq`` commands on jobs: submit, status, wait, list, cancel, results."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

from cli.group import cli, client_for, echo_job, settings_from_env
from cli.render import job_table, wait_with_progress
from db import JobStatus
from producer import CompletionClient


@cli.command()
@click.argument("prompt", required=False)
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL file: one request object per line.",
)
@click.option("--model")
@click.option("--max-new-tokens", type=int)
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--repetition-penalty", type=float)
@click.option("-n", "n", type=int, help="Number of choices.")
@click.option("--stop", multiple=True, help="Stop sequence (repeatable, up to 4).")
@click.option("--seed", type=int)
@click.option("--idempotency-key")
@click.option("--priority", type=int, help="0 (normal) to 9 (most urgent).")
@click.option(
    "--truncate",
    is_flag=True,
    default=None,
    help="Keep the prompt's last tokens when it is too long for the model's context "
    "(else the job fails).",
)
@click.option(
    "--wait",
    "wait_s",
    is_flag=False,
    flag_value=60.0,
    type=float,
    default=None,
    help="Wait for the result (optionally: seconds, default 60).",
)
def submit(prompt: str | None, file: Path | None, wait_s: float | None, **params: Any) -> None:
    """Submit one PROMPT, or every request in --file (prints the batch id)."""
    settings = settings_from_env()
    if (prompt is None) == (file is None):
        raise click.UsageError("give either a PROMPT or --file")
    request = {k: v for k, v in params.items() if v is not None and v != ()}
    if "stop" in request:
        request["stop"] = list(request["stop"])
    with client_for(settings) as client:
        if prompt is not None:
            job = client.submit(prompt, **request)
            if wait_s is not None:
                job = client.wait(job, timeout=wait_s)
            echo_job(job)
            return
        assert file is not None
        _submit_file(client, file, request, wait_s)


def _submit_file(
    client: CompletionClient, path: Path, defaults: dict[str, Any], wait_s: float | None
) -> None:
    requests = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(
                    f"line {number} is not JSON: {exc}", param_hint="--file"
                ) from None
            if not isinstance(data, dict):
                raise click.BadParameter(f"line {number} is not an object", param_hint="--file")
            requests.append({**defaults, **data})
    batch_id = uuid.uuid4().hex
    chunk = 500
    jobs = []
    with Progress(transient=True) as progress:
        task = progress.add_task("submitting", total=len(requests))
        for start in range(0, len(requests), chunk):
            jobs += client.submit_many(requests[start : start + chunk], batch_id=batch_id)
            progress.update(task, completed=len(jobs))
    click.echo(f"submitted {len(jobs)} jobs; batch id: {batch_id}")
    if wait_s is not None:
        wait_with_progress(client, [job.id for job in jobs], timeout=wait_s)


@cli.command()
@click.argument("job_id")
def status(job_id: str) -> None:
    """Print one job's row as JSON."""
    with client_for(settings_from_env()) as client:
        echo_job(client.get(job_id))


@cli.command()
@click.argument("job_id")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
def wait(job_id: str, timeout: float) -> None:
    """Wait until a job is finished, then print it as JSON."""
    with client_for(settings_from_env()) as client:
        echo_job(client.wait(job_id, timeout=timeout))


@cli.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in JobStatus]))
@click.option("--batch", "batch_id", help="Only jobs of this batch id.")
@click.option("--limit", default=50, show_default=True)
def list_(status_: str | None, batch_id: str | None, limit: int) -> None:
    """List jobs, newest first."""
    with client_for(settings_from_env()) as client:
        jobs = client.list(status=status_, batch_id=batch_id, limit=limit)
    Console().print(job_table(jobs))


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job (a running job's result is discarded)."""
    with client_for(settings_from_env()) as client:
        echo_job(client.cancel(job_id))


@cli.command()
@click.option("--batch", "batch_id", required=True, help="Batch id printed by `cq submit --file`.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="JSONL file to write, one job per line.",
)
def results(batch_id: str, out: Path) -> None:
    """Write every job of a batch (with its result) to a JSONL file."""
    with client_for(settings_from_env()) as client:
        jobs = client.list(batch_id=batch_id, limit=1_000_000)
    with out.open("w", encoding="utf-8") as handle:
        for job in sorted(jobs, key=lambda j: (j.created_at, str(j.id))):
            handle.write(json.dumps(job.to_dict(), ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
    click.echo(f"wrote {len(jobs)} jobs to {out} ({summary})")

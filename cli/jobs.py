"""``cq`` commands on jobs: submit, status, wait, list, cancel, results."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import Progress

from cli.group import ExitCode, cli, client_for, echo_job, fail, settings_from_env
from cli.render import job_table, show, wait_with_progress
from completion_queue import BrokerUnavailable, JobTimeout, ValidationError
from db import LANE_BATCH, Job, JobStatus
from producer import CompletionClient, CompletionRequest
from producer.ids import find_batch_id, find_job_id
from producer.scheduling import resolve_deadline


def _default(text: str, field: str) -> str:
    """``text`` with the request field's default, as click shows defaults."""
    return f"{text}  [default: {CompletionRequest.model_fields[field].default}]"


def _exit_for(jobs: list[Job]) -> None:
    """Exit 1 when a job waited for failed or was cancelled (after it was printed)."""
    bad = [job for job in jobs if job.status in (JobStatus.FAILED, JobStatus.CANCELLED)]
    if bad:
        sys.exit(ExitCode.JOB_FAILED)


def _wait(client: CompletionClient, ids: list[uuid.UUID], timeout: float, what: str) -> list[Job]:
    """Wait for ``ids``; on a timeout, say which ids (or ``what``) were waited for (exit 3)."""
    try:
        if len(ids) == 1:
            return [client.wait(ids[0], timeout=timeout)]
        return wait_with_progress(client, ids, timeout=timeout)
    except JobTimeout as exc:
        fail(f"{exc}; waited for {what}", ExitCode.TIMED_OUT)
    except KeyboardInterrupt:
        _interrupted(what)


def _interrupted(what: str) -> NoReturn:
    """Ctrl-C during a wait: the jobs go on; say which, exit 130 as shells do for SIGINT."""
    click.echo(f"\ninterrupted: stopped waiting for {what}, which still runs", err=True)
    sys.exit(ExitCode.INTERRUPTED)


def _warn_unserved(client: CompletionClient, models: set[str]) -> None:
    """Warn on stderr about models no live worker serves (their jobs stay queued)."""
    try:
        served = client.served_models()
    except BrokerUnavailable:
        return  # sending just worked: the broker went away since; the next command says so
    for model in sorted(models - set(served)):
        click.echo(
            f"warning: no live worker serves model {model!r}; its jobs stay queued until one "
            f"starts (cq worker --model {model})",
            err=True,
        )


@cli.command()
@click.argument("prompt", required=False)
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL file: one request object per line.",
)
@click.option("--model", help="Model to run (default: CQ_MODEL).")
@click.option(
    "--max-new-tokens", type=int, help=_default("Most tokens to generate.", "max_new_tokens")
)
@click.option("--temperature", type=float, help=_default("0 is greedy.", "temperature"))
@click.option("--top-p", type=float, help=_default("Nucleus sampling mass, (0, 1].", "top_p"))
@click.option(
    "--top-k", type=int, help=_default("Sample from the k likeliest tokens; 0: all.", "top_k")
)
@click.option(
    "--repetition-penalty",
    type=float,
    help=_default("Above 1 discourages repeats.", "repetition_penalty"),
)
@click.option("-n", "n", type=int, help=_default("Number of choices.", "n"))
@click.option("--stop", multiple=True, help="Stop sequence (repeatable, up to 4).")
@click.option("--seed", type=int, help="Seed for sampling, for repeatable results.")
@click.option(
    "--idempotency-key",
    help="A retry with the same key returns the same job (with --file, line i's key is KEY:i).",
)
@click.option("--priority", type=int, help="0 (normal) to 9 (most urgent).")
@click.option(
    "--deadline",
    help="Fail the job (deadline_exceeded) if it has not started by then: seconds from now, "
    "or an ISO-8601 time with a zone (at most 30 days away).",
)
@click.option(
    "--truncate",
    is_flag=True,
    default=None,
    help="Keep the prompt's last tokens when it is too long for the model's context "
    "(else the job fails).",
)
@click.option("--system", help="A system message: the job is a chat (with --user).")
@click.option(
    "--user",
    "user_message",
    help="The user's message of a chat job, rendered with the model's chat template "
    "(instead of PROMPT).",
)
@click.option(
    "--logprobs", type=int, help="Record each token's log probability and this many alternatives."
)
@click.option(
    "--json", "json_object", is_flag=True, default=None, help="Constrain the output to JSON."
)
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Constrain the output to JSON that validates against the JSON Schema in this file.",
)
@click.option(
    "--wait",
    "wait_s",
    is_flag=False,
    flag_value=60.0,
    type=float,
    default=None,
    help="Wait for the result (optionally: seconds, default 60). Before the prompt, give the "
    "seconds (--wait 60 PROMPT): a bare --wait takes the next word as them.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Print the first choice's text as it is generated, then a newline (exit status as "
    "for --wait; with --wait SECONDS, exit 3 when no new text came for that long).",
)
def submit(
    prompt: str | None,
    file: Path | None,
    wait_s: float | None,
    stream: bool,
    system: str | None,
    user_message: str | None,
    json_object: bool | None,
    json_schema: Path | None,
    **params: Any,
) -> None:
    """Submit one PROMPT, a chat (--system, --user), or every request in --file (prints the
    batch id; a line holds a prompt or messages). The lines of --file run in the batch lane,
    behind interactive work (a line may name its own "lane").

    Prints the job as JSON (once finished, with --wait), or its text as it is generated
    (--stream). Warns when no live worker serves the model (the jobs still queue).
    """
    settings = settings_from_env()
    if system is not None and user_message is None:
        raise click.UsageError("--system needs --user: a chat has a user message")
    if sum(x is not None for x in (prompt, file, user_message)) != 1:
        raise click.UsageError("give one of PROMPT, --user (a chat) or --file")
    if stream and file is not None:
        raise click.UsageError("--stream shows one job: give PROMPT or --user, not --file")
    request = {k: v for k, v in params.items() if v is not None and v != ()}
    if "deadline" in request:
        # Counted once from now, so every line of --file shares one deadline.
        request["deadline"] = resolve_deadline(_seconds_or_time(request["deadline"]))
    if "stop" in request:
        request["stop"] = list(request["stop"])
    if json_object and json_schema:
        raise click.UsageError("give --json or --json-schema, not both")
    if json_object:
        request["response_format"] = {"type": "json_object"}
    if json_schema is not None:
        request["response_format"] = _schema_format(json_schema)
    if user_message is not None:
        system_part = [] if system is None else [{"role": "system", "content": system}]
        request["messages"] = [*system_part, {"role": "user", "content": user_message}]
    if stream:
        request["stream"] = True
    with client_for(settings) as client:
        if file is None:
            job = client.submit(prompt, **request)
            _warn_unserved(client, {job.model})
            if stream:
                _stream(client, job, wait_s)
                return
            if wait_s is not None:
                job = _wait(client, [job.id], wait_s, f"job {job.id}")[0]
            echo_job(job)
            _exit_for([job])
            return
        assert file is not None
        _submit_file(client, file, request, wait_s)


def _seconds_or_time(value: str) -> float | str:
    """``--deadline``'s value: a number of seconds, or else the time as given."""
    try:
        return float(value)
    except ValueError:
        return value


def _stream(client: CompletionClient, job: Job, idle_timeout_s: float | None) -> None:
    """Print the job's first choice as it generates, then a newline; exit as ``--wait`` does."""
    try:
        for text in client.stream(job.id, idle_timeout=idle_timeout_s):
            click.echo(text, nl=False)  # click.echo flushes: each delta shows at once
    except JobTimeout as exc:
        click.echo()
        fail(f"{exc}; waited for job {job.id}", ExitCode.TIMED_OUT)
    except KeyboardInterrupt:
        _interrupted(f"job {job.id}")
    click.echo()
    final = client.get(job.id)
    if final.status is not JobStatus.SUCCEEDED:
        why = f": {final.error['message']}" if final.error and "message" in final.error else ""
        fail(f"job {job.id} {final.status.value}{why}", ExitCode.JOB_FAILED)


def _schema_format(path: Path) -> dict[str, Any]:
    """Return ``response_format`` for the JSON Schema in ``path``, named after the file."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}", param_hint="--json-schema") from None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


_REQUEST_INDEX = re.compile(r"^requests\[(\d+)\]: ")


def _read_file(path: Path, defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """Return the requests in a JSONL file, and the line number of each (from 1).

    ``--idempotency-key KEY`` gives request ``i`` the key ``KEY:i`` (as the API does for a
    list), unless its line has its own.
    """
    key = defaults.get("idempotency_key")
    defaults = {k: v for k, v in defaults.items() if k != "idempotency_key"}
    requests: list[dict[str, Any]] = []
    numbers: list[int] = []
    with path.open("rb") as raw_lines:
        for number, raw in enumerate(raw_lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise click.BadParameter(
                    f"line {number} is not valid UTF-8: {exc}", param_hint="--file"
                ) from None
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
            if key is not None and "idempotency_key" not in data:
                data = {**data, "idempotency_key": f"{key}:{len(requests)}"}
            requests.append({**defaults, **data})
            numbers.append(number)
    if not requests:
        raise click.BadParameter(f"{path} holds no requests", param_hint="--file")
    return requests, numbers


def _submit_file(
    client: CompletionClient, path: Path, defaults: dict[str, Any], wait_s: float | None
) -> None:
    requests, numbers = _read_file(path, defaults)
    batch_id = uuid.uuid4().hex
    chunk = 500
    jobs: list[Job] = []
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("submitting", total=len(requests))
        for start in range(0, len(requests), chunk):
            try:
                jobs += client.submit_many(
                    requests[start : start + chunk], batch_id=batch_id, lane=LANE_BATCH
                )
            except ValidationError as exc:
                # Name the file's line, as the JSON errors above do.
                index = _REQUEST_INDEX.match(str(exc))
                if index is None:
                    raise
                line = numbers[start + int(index.group(1))]
                message = _REQUEST_INDEX.sub(f"line {line}: ", str(exc))
                raise ValidationError(message, field=exc.field) from None
            progress.update(task, completed=len(jobs))
    # A resubmit under the same --idempotency-key returns the jobs of the first submit's batch.
    batches = {job.batch_id for job in jobs}
    if len(batches) == 1 and None not in batches:
        batch_id = str(batches.pop())
    click.echo(f"submitted {len(jobs)} jobs; batch id: {batch_id}")
    _warn_unserved(client, {job.model for job in jobs})
    if wait_s is not None:
        _exit_for(_wait(client, [job.id for job in jobs], wait_s, f"batch {batch_id}"))


@cli.command()
@click.argument("job_id")
def status(job_id: str) -> None:
    """Print one job's row as JSON (JOB_ID: a full id, a unique prefix, or a resp_ id)."""
    with client_for(settings_from_env()) as client:
        echo_job(client.get(find_job_id(client, job_id)))


@cli.command()
@click.argument("job_id")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
def wait(job_id: str, timeout: float) -> None:
    """Wait until a job is finished, then print it as JSON (exit 1 if it failed).

    JOB_ID: a full id or a unique prefix.
    """
    with client_for(settings_from_env()) as client:
        found = find_job_id(client, job_id)
        job = _wait(client, [found], timeout, f"job {found}")[0]
    echo_job(job)
    _exit_for([job])


@cli.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in JobStatus]))
@click.option("--batch", "batch_id", help="Only jobs of this batch id (or a unique prefix).")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full rows as JSON lines.")
def list_(status_: str | None, batch_id: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first (ids shortened: any unique prefix works in other commands)."""
    with client_for(settings_from_env()) as client:
        batch = find_batch_id(client, batch_id) if batch_id is not None else None
        jobs = client.list(status=status_, batch_id=batch, limit=limit)
    if as_json:
        for job in jobs:
            click.echo(json.dumps(job.to_dict(), ensure_ascii=False))
    elif not jobs:
        click.echo("no jobs" + (" match" if status_ or batch_id else " yet: cq submit 'Hello'"))
    else:
        show(job_table(jobs))


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job (a running one stops and keeps its tokens so far).

    JOB_ID: a full id or a unique prefix. A job that already succeeded or failed is
    printed as it is, with exit code 6; one already cancelled stays so (exit 0).
    """
    with client_for(settings_from_env()) as client:
        job = client.cancel(find_job_id(client, job_id))
    echo_job(job)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        fail(f"job {job.id} had already {job.status.value}: nothing to cancel", ExitCode.REFUSED)


@cli.command()
@click.option(
    "--batch",
    "batch_id",
    required=True,
    help="Batch id printed by `cq submit --file` (or a unique prefix).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="JSONL file to write, one job per line.",
)
def results(batch_id: str, out: Path) -> None:
    """Write every job of a batch (with its result) to a JSONL file."""
    with client_for(settings_from_env()) as client:
        batch = find_batch_id(client, batch_id)
        jobs = client.list(batch_id=batch, limit=1_000_000)
    try:
        with out.open("w", encoding="utf-8") as handle:
            for job in sorted(jobs, key=lambda j: (j.created_at, str(j.id))):
                handle.write(json.dumps(job.to_dict(), ensure_ascii=False) + "\n")
    except OSError as exc:
        why = f"cannot write {out}: {exc.strerror}"
        raise click.BadParameter(why, param_hint="--out") from None
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    click.echo(f"wrote {len(jobs)} jobs of batch {batch} to {out} ({summary})")

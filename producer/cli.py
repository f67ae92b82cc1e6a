"""``cq``: the command line for submitting, watching and running completion jobs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from completion_queue.celery_app import broker_url_file
from completion_queue.errors import CompletionError, ConfigError
from completion_queue.settings import Settings, redact_url
from db.jobs import Job
from db.migrate import upgrade
from db.models import JobStatus


def _settings(**overrides: Any) -> Settings:
    values = {key: value for key, value in overrides.items() if value is not None}
    return Settings(**values)


def _migrated(settings: Settings) -> Settings:
    """Create or upgrade the embedded SQLite database (configured databases use `cq db upgrade`)."""
    if not settings.database_url:
        upgrade(settings.resolved_database_url())
    return settings


def _client(settings: Settings) -> Any:
    from producer.client import CompletionClient

    return CompletionClient(settings=_migrated(settings))


def _echo_job(job: Job) -> None:
    click.echo(json.dumps(job.to_dict(), indent=2, ensure_ascii=False))


@contextlib.contextmanager
def embedded_broker(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a broker: ``CQ_BROKER_URL``, else an embedded redis-server."""
    if settings.broker_url:
        yield settings
        return
    from completion_queue.redis_server import EmbeddedRedis

    data = settings.data_dir / "redis"
    with EmbeddedRedis(data) as server:
        published = broker_url_file(settings)
        published.write_text(server.url)
        try:
            yield settings.model_copy(update={"broker_url": server.url})
        finally:
            published.unlink(missing_ok=True)


def worker_env(settings: Settings) -> dict[str, str]:
    """Return the ``CQ_*`` variables that give a child worker these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            env[f"CQ_{name.upper()}"] = ",".join(map(str, value))
        elif value is not None:
            env[f"CQ_{name.upper()}"] = str(value)
    return env


_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A span such as ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``."""

    name = "duration"
    _PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = self._PATTERN.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 12h, 7d or 2w", param, ctx)
        return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS_S[match.group(2)])


class _CliGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CompletionError as exc:
            click.echo(f"error: {redact_url(str(exc))}", err=True)
            sys.exit(2)


@click.group(cls=_CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """completion-queue: queue text-completion jobs for GPU workers; results land in SQL.

    Configuration comes from CQ_* environment variables (see README.md). With
    CQ_BROKER_URL unset, `cq up` and `cq demo` start an embedded redis-server; with
    CQ_DATABASE_URL unset, jobs live in a SQLite file under ./.cq/.
    """


# -- running things -------------------------------------------------------------


@cli.command()
@click.option("--jobs", "n_jobs", default=32, show_default=True, help="How many prompts to run.")
@click.option("--new-tokens", default=24, show_default=True, help="max_new_tokens per job.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for all jobs.")
def demo(n_jobs: int, new_tokens: int, timeout: float) -> None:
    """Start Redis and one worker, run prompts through the queue, print the results."""
    from producer.demo import run_demo

    sys.exit(
        run_demo(_migrated(_settings()), n_jobs=n_jobs, new_tokens=new_tokens, timeout=timeout)
    )


@cli.command()
def up() -> None:
    """Run an embedded broker and one worker in the foreground until Ctrl-C."""
    from completion_queue.local import WorkerProcess

    settings = _migrated(_settings())
    with embedded_broker(settings) as live:
        click.echo(f"broker: {redact_url(live.broker_url)}")
        click.echo(f"database: {redact_url(live.resolved_database_url())}")
        log_path = live.data_dir / "worker.log"
        with WorkerProcess(worker_env(live), log_path) as worker:
            worker.wait_ready()
            click.echo(f"worker {worker.pid} serving {live.model}; log: {log_path}")
            click.echo("submit from another shell: cq submit 'Hello' --wait   (Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                while worker.alive():
                    worker.process.wait()  # type: ignore[union-attr]
            click.echo("stopping")


@cli.command()
@click.option("--model", help="Hugging Face id or local path to serve [env CQ_MODEL].")
@click.option("--device", help="auto, cpu or cuda:N [env CQ_DEVICE].")
@click.option("--dtype", help="auto, float32, float16 or bfloat16 [env CQ_DTYPE].")
@click.option("--batch-size", type=int, help="Jobs per micro-batch [env CQ_BATCH_SIZE].")
@click.option(
    "--batch-wait-ms", type=int, help="Longest wait to fill a batch [env CQ_BATCH_WAIT_MS]."
)
@click.option(
    "--metrics-port", type=int, help="Prometheus /metrics port; 0 = off [env CQ_METRICS_PORT]."
)
@click.option("--hostname", help="Celery node name (default cq<pid>@<host>; %h = host name).")
def worker(
    model: str | None,
    device: str | None,
    dtype: str | None,
    batch_size: int | None,
    batch_wait_ms: int | None,
    metrics_port: int | None,
    hostname: str | None,
) -> None:
    """Run one worker process: load the model once, then serve its queue in micro-batches."""
    from workers.main import run_worker

    settings = _settings(
        model=model,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        metrics_port=metrics_port,
    )
    run_worker(_migrated(settings), hostname=hostname)


@cli.command()
@click.option("--jobs", default=1024, show_default=True, help="Jobs in the uniform workload.")
@click.option("--new-tokens", default=32, show_default=True, help="max_new_tokens per job.")
@click.option("--batch-size", default=32, show_default=True, help="Worker (and raw) batch size.")
@click.option("--model", default=None, help="Model to run [default: CQ_MODEL].")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=1, show_default=True, help="Also run with this many workers.")
@click.option("--engine", type=click.Choice(["static", "continuous"]), default="static",
              show_default=True, help="Worker engine.")  # fmt: skip
@click.option("--mixed-jobs", default=512, show_default=True, help="Jobs in the mixed workload.")
@click.option("--batch-lookahead", default=8, show_default=True,
              help="Batches' worth of jobs a worker takes at once.")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the figures to this JSON file.")  # fmt: skip
def bench(json_path: Path | None, model: str | None, **options: Any) -> None:
    """Measure the pipeline against direct generate and bare Celery, in one run."""
    from bench.report import print_report
    from bench.run import BenchConfig, run_bench

    config = BenchConfig(model=model or _settings().model, **options)
    figures = run_bench(config, progress=lambda line: click.echo(f"- {line}", err=True))
    print_report(figures)
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--log-level", default="info", show_default=True, help="uvicorn log level.")
def api(host: str, port: int, log_level: str) -> None:
    """Serve the HTTP API (native jobs, OpenAI-compatible completions and batches).

    Without CQ_API_KEYS it binds to loopback only. OpenAPI docs at /docs.
    """
    import uvicorn

    from completion_queue.settings import is_loopback
    from producer.api import create_api

    settings = _settings()
    if not settings.api_keys and not is_loopback(host):
        raise ConfigError(
            f"refusing to bind {host} without an API key: set CQ_API_KEYS, or bind 127.0.0.1"
        )
    app = create_api(_migrated(settings))
    click.echo(f"serving the API on http://{host}:{port} (docs: /docs)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@cli.command()
@click.option("--address", help="Address to bind [env CQ_FLOWER_ADDRESS, default 127.0.0.1].")
@click.option("--port", type=int, help="Port to bind [env CQ_FLOWER_PORT, default 5555].")
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep Flower's state in this file across restarts [env CQ_FLOWER_DB].",
)
def flower(address: str | None, port: int | None, db_path: Path | None) -> None:
    """Run Flower (`celery flower`) for the cluster; basic auth from CQ_FLOWER_BASIC_AUTH.

    Bound beyond loopback, Flower refuses to start without basic auth. /metrics
    (Prometheus) and /healthcheck stay open, as Flower serves them.
    """
    from producer.flower import run_flower

    run_flower(_settings(flower_address=address, flower_port=port, flower_db=db_path))


# -- jobs -------------------------------------------------------------------------


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
    settings = _settings()
    if (prompt is None) == (file is None):
        raise click.UsageError("give either a PROMPT or --file")
    request = {k: v for k, v in params.items() if v is not None and v != ()}
    if "stop" in request:
        request["stop"] = list(request["stop"])
    with _client(settings) as client:
        if prompt is not None:
            job = client.submit(prompt, **request)
            if wait_s is not None:
                job = client.wait(job, timeout=wait_s)
            _echo_job(job)
            return
        assert file is not None
        _submit_file(client, file, request, wait_s)


def _submit_file(client: Any, path: Path, defaults: dict[str, Any], wait_s: float | None) -> None:
    import uuid

    from rich.progress import Progress

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
        from producer.demo import wait_with_progress

        wait_with_progress(client, [job.id for job in jobs], timeout=wait_s)


@cli.command()
@click.argument("job_id")
def status(job_id: str) -> None:
    """Print one job's row as JSON."""
    with _client(_settings()) as client:
        _echo_job(client.get(job_id))


@cli.command()
@click.argument("job_id")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
def wait(job_id: str, timeout: float) -> None:
    """Wait until a job is finished, then print it as JSON."""
    with _client(_settings()) as client:
        _echo_job(client.wait(job_id, timeout=timeout))


@cli.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in JobStatus]))
@click.option("--batch", "batch_id", help="Only jobs of this batch id.")
@click.option("--limit", default=50, show_default=True)
def list_(status_: str | None, batch_id: str | None, limit: int) -> None:
    """List jobs, newest first."""
    from producer.demo import job_table

    with _client(_settings()) as client:
        jobs = client.list(status=status_, batch_id=batch_id, limit=limit)
    job_table(jobs).print()


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job (a running job's result is discarded)."""
    with _client(_settings()) as client:
        _echo_job(client.cancel(job_id))


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
    with _client(_settings()) as client:
        jobs = client.list(batch_id=batch_id, limit=1_000_000)
    with out.open("w", encoding="utf-8") as handle:
        for job in sorted(jobs, key=lambda j: (j.created_at, str(j.id))):
            handle.write(json.dumps(job.to_dict(), ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status.value] = counts.get(job.status.value, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
    click.echo(f"wrote {len(jobs)} jobs to {out} ({summary})")


# -- operations ---------------------------------------------------------------------


def _control_app(settings: Settings) -> Any:
    from completion_queue.celery_app import create_app

    return create_app(settings)


@cli.command()
@click.option(
    "--window",
    type=Duration(),
    default="5m",
    show_default=True,
    help="Throughput and latency over this last span.",
)
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def stats(window: timedelta, timeout: float, as_json: bool) -> None:
    """Jobs per status, throughput and p50/p95/p99 latency, queue depth per model, workers."""
    from rich.console import Console

    from producer.stats import cluster_stats, stats_view

    settings = _migrated(_settings())
    app = _control_app(settings)
    try:
        found = cluster_stats(settings, app, window_s=window.total_seconds(), timeout_s=timeout)
    finally:
        app.close()
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2))
    else:
        Console().print(stats_view(found))


@cli.command()
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for replies.")
@click.option("--hostname", help="Only this worker; exit 1 if it does not answer (healthchecks).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def workers(timeout: float, hostname: str | None, as_json: bool) -> None:
    """Live workers: the model each holds, its device, batch settings and jobs done."""
    import dataclasses

    from rich.console import Console

    from producer.stats import live_workers, workers_table

    app = _control_app(_settings())
    try:
        found = live_workers(app, timeout_s=timeout)
    finally:
        app.close()
    if hostname is not None:
        found = [w for w in found if w.hostname == hostname]
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(w) for w in found], indent=2))
    else:
        Console().print(workers_table(found))
    if hostname is not None and not found:
        sys.exit(1)


_FINISHED = [s.value for s in JobStatus if s.finished]


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    type=Duration(),
    required=True,
    help="Remove jobs finished longer ago than this (90s, 30m, 12h, 7d, 2w).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_FINISHED),
    help="Only jobs in this status (repeatable; default: every finished status).",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
def prune(older_than: timedelta, statuses: tuple[str, ...], dry_run: bool) -> None:
    """Remove old finished jobs (retention). Queued and running jobs are never removed."""
    from db.engine import make_engine, make_session_factory
    from db.jobs import prune_jobs, utcnow

    settings = _migrated(_settings())
    cutoff = utcnow() - older_than
    chosen = [JobStatus(s) for s in statuses or _FINISHED]
    engine = make_engine(settings.resolved_database_url())
    sessions = make_session_factory(engine)
    removed = 0
    try:
        if dry_run:
            with sessions() as session:
                removed = prune_jobs(session, finished_before=cutoff, statuses=chosen, limit=2**62)
                session.rollback()
        # One transaction per chunk: a large prune never holds one long lock.
        while not dry_run:
            with sessions.begin() as session:
                deleted = prune_jobs(session, finished_before=cutoff, statuses=chosen)
            removed += deleted
            if deleted == 0:
                break
    finally:
        engine.dispose()
    verb = "would remove" if dry_run else "removed"
    names = ", ".join(s.value for s in chosen)
    click.echo(f"{verb} {removed} job(s) ({names}) finished before {cutoff.isoformat()}")


# -- admin --------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the jobs table (Alembic) on CQ_DATABASE_URL."""
    settings = _settings()
    upgrade(settings.resolved_database_url(), revision)
    click.echo(f"database at {redact_url(settings.resolved_database_url())} is at {revision}")


@cli.command()
def reap() -> None:
    """Requeue jobs stuck running, and expire jobs queued too long (one reaper pass).

    A job running longer than CQ_REAP_RUNNING_AFTER_S goes back to the queue with
    a new message (a late result of its old attempt is discarded); one claimed
    CQ_MAX_ATTEMPTS times fails with AttemptsExceeded; one queued longer than
    CQ_QUEUE_TIMEOUT_S fails with QueueTimeout; an unfinished job of a batch
    (POST /v1/batches) 24 h old fails with BatchExpired. Workers run the same
    pass every CQ_REAP_INTERVAL_S.
    """
    from completion_queue.celery_app import create_app
    from completion_queue.reaper import reap as reap_once
    from db.engine import make_engine, make_session_factory

    settings = _migrated(_settings())
    app = create_app(settings)
    engine = make_engine(settings.resolved_database_url())
    try:
        report = reap_once(settings, app, make_session_factory(engine))
    finally:
        engine.dispose()
        app.close()
    click.echo(
        f"requeued {report.requeued} stuck job(s), failed {report.failed}, "
        f"expired {report.expired} queued job(s), resent {report.resent} lost message(s), "
        f"expired {report.batch_expired} job(s) of batches past their window"
    )


@cli.group()
def model() -> None:
    """Model commands."""


@model.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
def make_tiny(directory: Path, seed: int) -> None:
    """Build the tiny GPT-2-style model (random weights, local tokenizer) into DIRECTORY."""
    from workers.tiny import make_tiny_model

    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} exists and is not empty")
    path = make_tiny_model(directory, seed=seed)
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    click.echo(f"built tiny model in {path} ({size:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cq`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.main(args=argv, prog_name="cq")


if __name__ == "__main__":
    main()

"""``cq`` operations commands: stats, workers, prune, reap, db upgrade."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import timedelta

import click

from cli.group import Duration, ExitCode, cli, database, migrated, settings_from_env
from cli.render import backlog_table, show, stats_view, workers_table
from completion_queue import create_app, reap, redact_url
from db import JobStatus, prune_jobs, upgrade, utcnow
from producer.backlog import model_backlogs
from producer.stats import broker_client, cluster_stats, live_workers


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
    if window.total_seconds() <= 0:
        raise click.BadParameter("must be longer than 0s", param_hint="--window")
    settings = migrated(settings_from_env())
    app = create_app(settings)
    try:
        found = cluster_stats(settings, app, window_s=window.total_seconds(), timeout_s=timeout)
    finally:
        app.close()
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2))
    else:
        show(stats_view(found))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backlog(as_json: bool) -> None:
    """Per model: queued jobs and tokens, running jobs, workers, tokens/s per worker, and the
    workers that drain the queue within CQ_SCALE_DRAIN_TARGET_S (what autoscalers read)."""
    settings = migrated(settings_from_env())
    app = create_app(settings)
    try:
        with database(settings) as sessions, sessions() as session, broker_client(app) as client:
            found = model_backlogs(settings, session, client)
    finally:
        app.close()
    if as_json:
        click.echo(json.dumps({"models": {m: b.to_dict() for m, b in found.items()}}, indent=2))
    else:
        show(backlog_table(found))


@cli.command()
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for replies.")
@click.option("--hostname", help="Only this worker; exit 4 if it does not answer (healthchecks).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def workers(timeout: float, hostname: str | None, as_json: bool) -> None:
    """Live workers: the model each holds, engine, device, threads, batch settings, jobs done."""
    app = create_app(settings_from_env())
    try:
        found = live_workers(app, timeout_s=timeout)
    finally:
        app.close()
    if hostname is not None:
        found = [w for w in found if w.hostname == hostname]
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(w) for w in found], indent=2))
    else:
        show(workers_table(found))
    if hostname is not None and not found:
        sys.exit(ExitCode.NOT_FOUND)


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
    settings = migrated(settings_from_env())
    cutoff = utcnow() - older_than
    chosen = [JobStatus(s) for s in statuses or _FINISHED]
    removed = 0
    with database(settings) as sessions:
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
    verb = "would remove" if dry_run else "removed"
    names = ", ".join(s.value for s in chosen)
    click.echo(f"{verb} {removed} job(s) ({names}) finished before {cutoff.isoformat()}")


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the jobs table (Alembic) on CQ_DATABASE_URL."""
    settings = settings_from_env()
    upgrade(settings.resolved_database_url(), revision)
    click.echo(f"database at {redact_url(settings.resolved_database_url())} is at {revision}")


@cli.command("reap")
def reap_command() -> None:
    """Requeue jobs stuck running, and expire jobs queued too long (one reaper pass).

    A job running longer than CQ_REAP_RUNNING_AFTER_S goes back to the queue with
    a new message (a late result of its old attempt is discarded); one claimed
    CQ_MAX_ATTEMPTS times fails with AttemptsExceeded; one queued longer than
    CQ_QUEUE_TIMEOUT_S fails with QueueTimeout; one still queued past its deadline
    fails with DeadlineExceeded (a line of a batch, POST /v1/batches, whose 24 h
    window closed: BatchExpired). Workers run the same pass every CQ_REAP_INTERVAL_S.
    """
    settings = migrated(settings_from_env())
    app = create_app(settings)
    try:
        with database(settings) as sessions:
            report = reap(settings, app, sessions)
    finally:
        app.close()
    click.echo(
        f"requeued {report.requeued} stuck job(s), failed {report.failed}, "
        f"expired {report.expired} queued job(s), resent {report.resent} lost message(s), "
        f"failed {report.past_deadline} queued job(s) past their deadline"
    )

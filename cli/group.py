"""The ``cq`` click group: settings from the environment, errors shown as one line, and the
exit codes scripts can trust."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from datetime import timedelta
from enum import IntEnum
from typing import Any, NoReturn

import click
import redis
from kombu.exceptions import OperationalError as KombuError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from completion_queue import (
    BrokerNotRunning,
    BrokerUnavailable,
    CompletionError,
    EmbeddedRedisError,
    IdempotencyConflict,
    JobNotFound,
    JobTimeout,
    ModelNotAllowed,
    QueueFull,
    Settings,
    redact_url,
)
from db import Job, make_engine, make_session_factory, upgrade
from producer import CompletionClient


def settings_from_env(**overrides: Any) -> Settings:
    """Return the settings from ``CQ_*``, with the options given on the command line."""
    values = {key: value for key, value in overrides.items() if value is not None}
    return Settings(**values)


def migrated(settings: Settings) -> Settings:
    """Create or upgrade the embedded SQLite database (configured databases use `cq db upgrade`)."""
    if not settings.database_url:
        upgrade(settings.resolved_database_url())
    return settings


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the settings' database, its engine disposed of on the way out."""
    engine = make_engine(settings.resolved_database_url())
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def client_for(settings: Settings) -> CompletionClient:
    """Return a client on ``settings``, the embedded database migrated first."""
    return CompletionClient(settings=migrated(settings))


def echo_job(job: Job) -> None:
    """Print one job's row as indented JSON."""
    click.echo(json.dumps(job.to_dict(), indent=2, ensure_ascii=False))


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


class ExitCode(IntEnum):
    """What a ``cq`` command's exit status means (in `cq --help` and README.md)."""

    OK = 0
    JOB_FAILED = 1
    USAGE = 2
    TIMED_OUT = 3
    NOT_FOUND = 4
    UNREACHABLE = 5
    REFUSED = 6
    INTERRUPTED = 130


EXIT_MEANINGS = {
    ExitCode.OK: "done; every job waited for succeeded",
    ExitCode.JOB_FAILED: "a job waited for failed or was cancelled",
    ExitCode.USAGE: "usage or invalid input",
    ExitCode.TIMED_OUT: "a wait timed out (the ids waited for are printed)",
    ExitCode.NOT_FOUND: "no such job or batch",
    ExitCode.UNREACHABLE: "the broker or the database cannot be reached",
    ExitCode.REFUSED: "refused: queue full, quota, idempotency key reused, job already finished",
    ExitCode.INTERRUPTED: "Ctrl-C during a wait; the jobs still run (their ids are printed)",
}

#: Errors by exit code, most specific first (any other CompletionError is USAGE).
_EXITS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], ExitCode], ...] = (
    (JobTimeout, ExitCode.TIMED_OUT),
    (JobNotFound, ExitCode.NOT_FOUND),
    ((BrokerUnavailable, BrokerNotRunning, EmbeddedRedisError), ExitCode.UNREACHABLE),
    ((QueueFull, IdempotencyConflict, ModelNotAllowed), ExitCode.REFUSED),
)


def fail(message: str, code: ExitCode) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    click.echo(f"error: {redact_url(message)}", err=True)
    sys.exit(code)


class _CliGroup(click.Group):
    """Shows errors as one ``error:`` line with its exit code, never as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CompletionError as exc:
            code = next((c for kinds, c in _EXITS if isinstance(exc, kinds)), ExitCode.USAGE)
            fail(str(exc), code)
        except (OperationalError, InterfaceError) as exc:
            first = str(exc.orig or exc).strip().splitlines()[0]
            fail(f"database error: {first}", ExitCode.UNREACHABLE)
        except (redis.ConnectionError, redis.TimeoutError, KombuError) as exc:
            fail(f"the broker cannot be reached: {exc}", ExitCode.UNREACHABLE)


_EXIT_HELP = "\b\nExit codes:\n" + "\n".join(f"  {c}  {m}" for c, m in EXIT_MEANINGS.items())


@click.group(
    cls=_CliGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_EXIT_HELP,
)
def cli() -> None:
    """completion-queue: queue text-completion jobs for GPU workers; results land in SQL.

    Configuration comes from CQ_* environment variables (see README.md). With
    CQ_BROKER_URL unset, `cq up` and `cq demo` start an embedded redis-server; with
    CQ_DATABASE_URL unset, jobs live in a SQLite file under ./.cq/.
    """

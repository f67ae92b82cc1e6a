"""``cq keys`` (the API's tenants: create, list, set-weight, revoke) and ``cq usage`` (what
they used)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from datetime import datetime, timedelta

import click
from rich.table import Table

from cli.group import Duration, cli, database, migrated, settings_from_env
from cli.render import show
from completion_queue import ConfigError
from db import (
    TenantExists,
    create_tenant,
    list_tenants,
    new_key,
    revoke_tenant,
    set_tenant_weight,
    usage,
    utcnow,
)

#: What a tenant's name may be: it shows in logs, rows and URLs of no one else.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Weight(click.ParamType):  # type: ignore[type-arg]
    """A tenant's weight: a finite number above 0."""

    name = "weight"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            weight = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"must be a number, got {value!r}", param, ctx)
        if not math.isfinite(weight) or weight <= 0:
            self.fail(f"must be a finite number above 0, got {value!r}", param, ctx)
        return weight


WEIGHT_HELP = (
    "Its share of a model's workers relative to the other tenants' (2: twice a tenant of 1)."
)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


@cli.group()
def keys() -> None:
    """API keys: each is a tenant that sees only its own jobs, files and batches."""


@keys.command("create")
@click.argument("name")
@click.option("--models", help="Comma-separated models it may use [default: any].")
@click.option("--max-queued", type=click.IntRange(min=1), help="Most jobs queued at once.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Requests per second.")
@click.option("--weight", type=Weight(), default=1.0, show_default=True, help=WEIGHT_HELP)
def keys_create(
    name: str, models: str | None, max_queued: int | None, rate: float | None, weight: float
) -> None:
    """Create tenant NAME and print its key, once, alone on the last line.

    Only a hash of the key is stored: keep it now, or revoke it and create another.
    """
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"NAME must be 1 to 64 letters, digits, '.', '_' or '-' (not first), got {name!r}"
        )
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    key = new_key()
    with database(migrated(settings_from_env())) as sessions, sessions.begin() as session:
        try:
            create_tenant(
                session,
                name=name,
                key=key,
                models=allowed,
                max_queued=max_queued,
                rate=rate,
                weight=weight,
            )
        except TenantExists as exc:
            raise ConfigError(f"{exc} (a revoked one keeps its name): pick another") from None
    click.echo(f"created tenant {name}; its API key (shown once):")
    click.echo(key)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def keys_list(as_json: bool) -> None:
    """Every tenant: its limits, when it was created and last used (never its key)."""
    with database(migrated(settings_from_env())) as sessions, sessions() as session:
        tenants = list_tenants(session)
    if as_json:
        rows = [dataclasses.asdict(tenant) for tenant in tenants]
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table()
    columns = (
        "name",
        "models",
        "max queued",
        "rate/s",
        "weight",
        "created",
        "last used",
        "revoked",
    )
    for column in columns:
        table.add_column(column, no_wrap=True)
    for t in tenants:
        table.add_row(
            t.name,
            ",".join(t.models) if t.models else "any",
            str(t.max_queued or "-"),
            f"{t.rate:g}" if t.rate else "-",
            f"{t.weight:g}",
            _when(t.created_at),
            _when(t.last_used_at),
            _when(t.revoked_at),
        )
    show(table)


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Refuse tenant NAME's key from its next request on (its jobs stay)."""
    with database(migrated(settings_from_env())) as sessions, sessions.begin() as session:
        if not revoke_tenant(session, name=name):
            raise ConfigError(f"no live tenant named {name!r} (see `cq keys list`)")
    click.echo(f"revoked {name}")


@keys.command("set-weight")
@click.argument("name")
@click.argument("weight", type=Weight())
def keys_set_weight(name: str, weight: float) -> None:
    """Set tenant NAME's WEIGHT: its share of a model's workers relative to the others'."""
    with database(migrated(settings_from_env())) as sessions, sessions.begin() as session:
        if not set_tenant_weight(session, name=name, weight=weight):
            raise ConfigError(f"no live tenant named {name!r} (see `cq keys list`)")
    click.echo(f"weight of {name}: {weight:g}")


@cli.command("usage")
@click.option("--tenant", help="Only this tenant's jobs [default: every tenant].")
@click.option(
    "--since", type=Duration(), default="7d", show_default=True, help="How far back, e.g. 24h."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def usage_command(tenant: str | None, since: timedelta, as_json: bool) -> None:
    """Jobs and tokens per tenant, model and day (UTC) of the jobs finished lately."""
    end = utcnow()
    with database(migrated(settings_from_env())) as sessions, sessions() as session:
        rows = usage(session, start=end - since, end=end, tenant=tenant)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(row) for row in rows], indent=2, default=str))
        return
    table = Table()
    for column in ("day", "tenant", "model", "jobs", "prompt tokens", "completion tokens"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            row.day.isoformat(),
            row.tenant or "-",
            row.model,
            str(row.jobs),
            str(row.prompt_tokens),
            str(row.completion_tokens),
        )
    show(table)

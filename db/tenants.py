"""Tenants of the HTTP API: who a key belongs to, what it may do, and what it used.

A tenant is one API key. Only the key's SHA-256 is stored: the key is a random
256-bit token, so a fast hash is as safe as a slow one and costs nothing per
request. Revoking keeps the row (its name stays on its jobs) and refuses the key
from the next request on.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from db.models import JobRow, TenantRow
from db.snapshots import aware, utcnow

#: What every generated key starts with, so that a leaked one is easy to recognise.
KEY_PREFIX = "cq-"
#: ``last_used_at`` is written at most this often per tenant (not on every request).
TOUCH_EVERY = timedelta(minutes=1)


#: PostgreSQL advisory lock key held by a submit under a queue bound, from its count to its
#: commit: the bytes of "cq-quota". Without it, submits at once each counted the others out.
QUOTA_LOCK_KEY = int.from_bytes(b"cq-quota", "big")


def lock_queue_bounds(session: Session) -> None:
    """Hold the queue bounds' lock until ``session``'s transaction ends (PostgreSQL), so
    that submits from several API processes count and insert one at a time. On SQLite,
    the client's own lock orders one process's threads; processes sharing one SQLite
    file may still each count before the other writes."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": QUOTA_LOCK_KEY})


def new_key() -> str:
    """Return a fresh API key: ``cq-`` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Return the stored form of ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant: its name and quotas (None: no limit), and when it was made and used."""

    name: str
    models: list[str] | None = None
    max_queued: int | None = None
    rate: float | None = None
    #: Its share of a model's workers relative to the other tenants' (fair share).
    weight: float = 1.0
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    @classmethod
    def from_row(cls, row: TenantRow) -> Tenant:
        """Build a snapshot from an ORM row."""
        return cls(
            name=row.name,
            models=row.models,
            max_queued=row.max_queued,
            rate=row.rate,
            weight=row.weight,
            created_at=aware(row.created_at),
            last_used_at=aware(row.last_used_at),
            revoked_at=aware(row.revoked_at),
        )


class TenantExists(ValueError):
    """A tenant of that name exists already."""


def create_tenant(
    session: Session,
    *,
    name: str,
    key: str,
    models: list[str] | None = None,
    max_queued: int | None = None,
    rate: float | None = None,
    weight: float = 1.0,
) -> Tenant:
    """Store a tenant whose key is ``key``; raise :class:`TenantExists` if the name is taken."""
    if session.get(TenantRow, name) is not None:
        raise TenantExists(f"a tenant named {name!r} exists already")
    row = TenantRow(
        name=name,
        key_hash=hash_key(key),
        models=models,
        max_queued=max_queued,
        rate=rate,
        weight=weight,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return Tenant.from_row(row)


def list_tenants(session: Session) -> list[Tenant]:
    """Every tenant, revoked ones included, by name."""
    return [Tenant.from_row(row) for row in session.scalars(select(TenantRow).order_by("name"))]


def tenant_weights(session: Session) -> dict[str, float]:
    """Each live tenant's weight by name (revoked tenants left out): one query."""
    stmt = select(TenantRow.name, TenantRow.weight).where(TenantRow.revoked_at.is_(None))
    return {name: float(weight) for name, weight in session.execute(stmt)}


def set_tenant_weight(session: Session, *, name: str, weight: float) -> bool:
    """Set a live tenant's weight; False if there is no such live tenant."""
    result = session.execute(
        update(TenantRow)
        .where(TenantRow.name == name, TenantRow.revoked_at.is_(None))
        .values(weight=weight)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def revoke_tenant(session: Session, *, name: str) -> bool:
    """Refuse the tenant's key from now on; False if there is no such live tenant."""
    result = session.execute(
        update(TenantRow)
        .where(TenantRow.name == name, TenantRow.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def tenant_by_key(session: Session, *, key: str) -> Tenant | None:
    """The live tenant whose key is ``key``, or None; notes the use (once a minute at most)."""
    row = session.scalars(
        select(TenantRow).where(TenantRow.key_hash == hash_key(key), TenantRow.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    now = utcnow()
    last = aware(row.last_used_at)
    if last is None or now - last >= TOUCH_EVERY:
        row.last_used_at = now
    return Tenant.from_row(row)


def has_live_tenants(session: Session) -> bool:
    """True when any tenant's key is live (then every API request needs a key)."""
    return (
        session.scalar(select(TenantRow.name).where(TenantRow.revoked_at.is_(None)).limit(1))
        is not None
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """What one tenant used of one model on one day (UTC), by when its jobs finished."""

    tenant: str | None
    model: str
    day: date
    jobs: int
    prompt_tokens: int
    completion_tokens: int


def usage(
    session: Session, *, start: datetime, end: datetime, tenant: str | None = None
) -> list[Usage]:
    """Jobs and tokens per tenant, model and day, of jobs finished in ``[start, end)``.

    ``tenant`` None: every tenant's (and the jobs without one).
    """
    finished: Any = JobRow.finished_at
    if session.get_bind().dialect.name == "postgresql":
        finished = func.timezone("UTC", finished)  # the day in UTC, whatever the session's zone
    day = func.date(finished)
    stmt = (
        select(
            JobRow.tenant,
            JobRow.model,
            day,
            func.count(),
            func.coalesce(func.sum(JobRow.prompt_tokens), 0),
            func.coalesce(func.sum(JobRow.completion_tokens), 0),
        )
        .where(JobRow.finished_at >= start, JobRow.finished_at < end)
        .group_by(JobRow.tenant, JobRow.model, day)
        .order_by(day, JobRow.tenant, JobRow.model)
    )
    if tenant is not None:
        stmt = stmt.where(JobRow.tenant == tenant)
    return [
        Usage(
            tenant=name,
            model=model,
            day=when if isinstance(when, date) else date.fromisoformat(str(when)),
            jobs=int(jobs),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
        )
        for name, model, when, jobs, prompt, completion in session.execute(stmt)
    ]

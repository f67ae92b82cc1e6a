"""Schema migrations, run through Alembic's own API, one process at a time per database.

Every process that starts on a fresh database may migrate it (``cq up``, ``cq submit``,
workers and APIs started together), so :func:`upgrade` takes a lock first; whoever
gets it second finds the schema at head and does nothing:

- a SQLite file: an OS file lock on ``<database file>.migrate.lock`` beside it
  (released by the OS if its holder dies); an in-memory database needs none;
- PostgreSQL: the transaction-level advisory lock :data:`MIGRATION_LOCK_KEY`, taken
  by ``migrations/env.py`` on the connection Alembic migrates with, before Alembic
  reads the current revision, and released when that transaction ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

#: PostgreSQL advisory lock key held while a database migrates: the bytes of
#: ``b"cqmigrat"`` as a bigint (0x63716d6967726174). Advisory keys are per database.
MIGRATION_LOCK_KEY = 7_165_628_781_597_712_756


def alembic_config(url: str) -> Config:
    """Return an Alembic config that migrates the database at ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an option: URLs may hold '%' that configparser mangles.
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (the latest by default).

    Safe when several processes call it at once on the same database: they
    migrate one after the other, and the later ones find nothing to do.
    """
    with sqlite_migration_lock(url):
        command.upgrade(alembic_config(url), revision)


@contextlib.contextmanager
def sqlite_migration_lock(url: str) -> Iterator[None]:
    """Hold the file lock beside a SQLite database file (nothing for other databases)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".migrate.lock")):
        yield


def lock_postgres_migrations(connection: Connection) -> None:
    """Wait for and hold :data:`MIGRATION_LOCK_KEY` until ``connection``'s transaction ends.

    Call it inside the migration's transaction, before Alembic reads the current
    revision. It does nothing on databases other than PostgreSQL.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})

"""Real services for the tests: a PostgreSQL cluster started on a free port."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from completion_queue import free_port


def find_pg_bin() -> Path:
    """Return the directory holding initdb/pg_ctl (PATH first, then Debian's layout)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: run `make services` (or apt-get install postgresql)"
    )


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on loopback, trust auth."""

    def __init__(self, *, settings: Sequence[str] = ()) -> None:
        """``settings``: server settings as ``name=value`` (``max_connections=500``)."""
        self.settings = list(settings)
        # Its own directory under /tmp: pytest's tmp dirs are private to root, and
        # initdb runs as the postgres user when the tests run as root.
        self.base = Path(tempfile.mkdtemp(prefix="cq-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.bin = find_pg_bin()
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, timeout=120, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr or done.stdout}")

    def start(self) -> PostgresCluster:
        """Create and start the cluster; return when it accepts connections."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
            os.chmod(self.base, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        return self.resume()

    def halt(self) -> None:
        """Stop the server, keeping its data: clients get connection errors until :meth:`resume`."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> PostgresCluster:
        """Start the server on its port and data; return when it accepts connections."""
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {setting}" for setting in self.settings)
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.base / "pg.log"),
            "-w",
            "start",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    @property
    def admin_dsn(self) -> str:
        """A libpq DSN for the postgres database."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the cluster (fast shutdown)."""
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

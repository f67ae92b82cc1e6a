"""Migrations under a lock: several processes migrating one fresh database at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from alembic.script import ScriptDirectory
from sqlalchemy import text

from db import JobStatus, get_job, make_engine, make_session_factory
from db.migrate import alembic_config
from tests.conftest import until
from tests.services import PostgresCluster

N_PROCESSES = 4

# The `cq` console script's own entry point, run once the CLI is imported and the test
# closes stdin: the processes then race on the migration, not on how fast Python starts.
LAUNCH = """
import pathlib, sys
from cli import main
pathlib.Path(sys.argv.pop(1)).touch()
sys.stdin.read()
main()
"""


@dataclass
class Cq:
    """One ``cq`` process, with its output in files."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout_s: float = 120) -> int:
        return self.process.wait(timeout_s)


@contextlib.contextmanager
def cq_together(
    commands: Sequence[Sequence[str]], env: dict[str, str], tmp: Path
) -> Iterator[list[Cq]]:
    """Start ``cq <command>`` for each command, released at the same instant.

    Every process and its descendants are killed on the way out, whatever happened.
    """
    started: list[Cq] = []
    try:
        for n, args in enumerate(commands):
            out, err = tmp / f"cq{n}.out", tmp / f"cq{n}.err"
            with out.open("wb") as o, err.open("wb") as e:
                process = subprocess.Popen(
                    [sys.executable, "-c", LAUNCH, str(tmp / f"cq{n}.ready"), *args],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=o,
                    stderr=e,
                    start_new_session=True,
                )
            started.append(Cq(process, out, err))
        until(lambda: all((tmp / f"cq{n}.ready").exists() for n in range(len(commands))), 60)
        for cq in started:
            assert cq.process.stdin is not None
            cq.process.stdin.close()
        yield started
    finally:
        for cq in started:
            kill_tree(cq.process)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process``, its process group and every descendant still running."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(30)
    psutil.wait_procs(descendants, timeout=30)


def cq_env(**values: str) -> dict[str, str]:
    """The environment with no ``CQ_*`` variable but ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQ_")}
    return {**env, **{f"CQ_{k.upper()}": v for k, v in values.items()}}


def versions(url: str) -> list[str]:
    """The rows of ``alembic_version``."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()


def head(url: str) -> str:
    revision = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert revision is not None
    return revision


def upgrade_at_once(url: str, tmp: Path) -> None:
    """Run ``cq db upgrade`` in N processes at once on ``url``; all must succeed."""
    with cq_together([["db", "upgrade"]] * N_PROCESSES, cq_env(database_url=url), tmp) as procs:
        codes = [cq.wait() for cq in procs]
        assert codes == [0] * N_PROCESSES, [cq.stderr() for cq in procs]
        assert all("is at head" in cq.stdout() for cq in procs)


def test_concurrent_upgrades_of_a_fresh_postgres_database(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    # Given a fresh, empty PostgreSQL database
    url = postgres.create_database(f"cq_{uuid.uuid4().hex[:12]}")
    # When four processes run `cq db upgrade` on it at the same instant
    upgrade_at_once(url, tmp_path)
    # Then each exited 0, and the schema is at head, stamped once
    assert versions(url) == [head(url)]


def test_concurrent_upgrades_of_a_fresh_sqlite_file(tmp_path: Path) -> None:
    # Given a SQLite file that does not exist yet
    url = f"sqlite:///{tmp_path / 'data' / 'cq.db'}"
    # When four processes run `cq db upgrade` on it at the same instant
    upgrade_at_once(url, tmp_path)
    # Then each exited 0, and the schema is at head, stamped once
    assert versions(url) == [head(url)]


def test_up_and_submit_at_once_on_a_fresh_data_dir(tiny_model: Path, tmp_path: Path) -> None:
    # Given a fresh, empty data directory and nothing configured but it and the model
    data = tmp_path / "data"
    data.mkdir()
    env = cq_env(data_dir=str(data), model=str(tiny_model))
    # When `cq up` and `cq submit` start at the same instant (both migrate the new SQLite file)
    with cq_together([["up"], ["submit", "Hello"]], env, tmp_path) as (up, submit):
        # Then the submit waits for the broker `cq up` is starting, and queues its job
        assert submit.wait() == 0, submit.stderr()
        printed = submit.stdout()
        job = json.loads(printed)
        assert job["prompt"] == "Hello"
        # And `cq up` serves, and stops on Ctrl-C leaving no process behind
        until(lambda: "serving" in up.stdout() or up.process.poll() is not None, 180)
        assert "worker " in up.stdout() and " serving " in up.stdout(), up.stderr()
        children = psutil.Process(up.process.pid).children(recursive=True)
        os.killpg(up.process.pid, signal.SIGINT)
        assert up.wait(120) == 0, up.stderr()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    # And the job is in the database, queued or already done
    url = f"sqlite:///{data / 'cq.db'}"
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            row = get_job(session, job_id=uuid.UUID(job["id"]))
    finally:
        engine.dispose()
    assert row is not None and row.status in {JobStatus.QUEUED, JobStatus.SUCCEEDED}
    assert versions(url) == [head(url)]

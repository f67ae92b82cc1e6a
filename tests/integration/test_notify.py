"""Waiting without polling on PostgreSQL: the jobs' NOTIFY trigger, and waits that LISTEN."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

from completion_queue import Settings
from db import (
    NOTIFY_CHANNEL,
    Choice,
    Job,
    JobNotice,
    JobStatus,
    NewJob,
    Outcome,
    claim_jobs,
    create_jobs,
    finish_jobs,
    make_engine,
    make_session_factory,
    parse_notice,
)
from db.migrate import alembic_config
from producer.client import CompletionClient
from tests.conftest import new_database
from tests.services import PostgresCluster

N_JOBS = 100
#: The finisher commits the jobs in this many transactions, this far apart (~1 s in all).
COMMITS, COMMIT_EVERY_S = 4, 0.25
#: A wait returns this soon after the last commit (the mechanism's latency bound).
WAKE_WITHIN_S = 0.05


@pytest.fixture
def pg_url(postgres: PostgresCluster, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated PostgreSQL database."""
    return new_database("postgresql", request, tmp_path)


def dsn(postgres: PostgresCluster, url: str) -> str:
    """A libpq DSN for the database of ``url`` on ``postgres``."""
    return f"host=127.0.0.1 port={postgres.port} user=postgres dbname={make_url(url).database}"


def client_on(url: str, tmp: Path) -> CompletionClient:
    return CompletionClient(database_url=url, settings=Settings(database_url=url, data_dir=tmp))


def running_jobs(engine: Engine, n: int) -> list[uuid.UUID]:
    """Insert ``n`` jobs and claim them (running, attempt 1), as a worker would."""
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        created = create_jobs(session, jobs=[NewJob("m", f"p{i}", {}) for i in range(n)])
        ids = [job.id for job, _ in created]
        claim_jobs(session, job_ids=ids, worker="w")
    return ids


def succeed(engine: Engine, ids: list[uuid.UUID]) -> None:
    """Write a result for each running job in ``ids``, in one transaction."""
    outcomes = [
        Outcome(i, 1, JobStatus.SUCCEEDED, [Choice("done", "stop", 3)], prompt_tokens=2)
        for i in ids
    ]
    with make_session_factory(engine).begin() as session:
        finish_jobs(session, outcomes=outcomes)


class Finisher(threading.Thread):
    """Finishes jobs on its own engine in a few commits spread over ~1 s; notes the last one."""

    def __init__(self, url: str, ids: list[uuid.UUID]) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(url)
        self.ids = ids
        self.last_commit = 0.0
        self.go = threading.Event()

    def run(self) -> None:
        self.go.wait(30)
        size = -(-len(self.ids) // COMMITS)
        for start in range(0, len(self.ids), size):
            time.sleep(COMMIT_EVERY_S)
            succeed(self.engine, self.ids[start : start + size])
            self.last_commit = time.monotonic()
        self.engine.dispose()


@contextlib.contextmanager
def statements_of(client: CompletionClient) -> Iterator[list[str]]:
    """Record every SQL statement the client's engine executes meanwhile."""
    engine = client.sessions.kw["bind"]
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def listening_backends(engine: Engine) -> int:
    """How many connections to ``engine``'s database sit in ``LISTEN cq_jobs``."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN cq_jobs'"
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def test_updates_of_status_or_tokens_notify_their_job(
    postgres: PostgresCluster, pg_url: str
) -> None:
    # Given a queued job, and a plain psycopg connection listening on cq_jobs
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        ((job, _),) = create_jobs(session, jobs=[NewJob("m", "p", {})])
    with psycopg.connect(dsn(postgres, pg_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        # When a worker claims it, refreshes its progress, touches a column that is neither,
        # then writes its result
        with sessions.begin() as session:
            claim_jobs(session, job_ids=[job.id], worker="w")
        with engine.begin() as conn:
            progress = "UPDATE jobs SET completion_tokens = 2 WHERE id = :id"
            conn.execute(text(progress), {"id": job.id})
            conn.execute(text("UPDATE jobs SET priority = 5 WHERE id = :id"), {"id": job.id})
        succeed(engine, [job.id])
        # Then it hears one notification per change of status or tokens, in commit order
        payloads = [n.payload for n in listener.notifies(timeout=10, stop_after=3)]
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
    engine.dispose()
    assert [parse_notice(p) for p in payloads] == [
        JobNotice(job.id, JobStatus.RUNNING, None),
        JobNotice(job.id, JobStatus.RUNNING, 2),
        JobNotice(job.id, JobStatus.SUCCEEDED, 3),
    ]
    assert json.loads(payloads[-1]) == {
        "id": str(job.id),
        "status": "succeeded",
        "completion_tokens": 3,
    }


def test_wait_of_100_jobs_listens_instead_of_polling(pg_url: str, tmp_path: Path) -> None:
    # Given 100 running jobs that another connection finishes in 4 commits over ~1 s
    with client_on(pg_url, tmp_path) as client:
        ids = running_jobs(make_engine(pg_url), N_JOBS)
        finisher = Finisher(pg_url, ids)
        finisher.start()
        # When the client waits for them all
        with statements_of(client) as statements:
            finisher.go.set()
            done = client.wait(ids, timeout=60)
            returned = time.monotonic()
        # Then they are all back, finished
        assert [job.id for job in done] == ids
        assert {job.status for job in done} == {JobStatus.SUCCEEDED}
        # and its engine ran two statements in all: the first read and the final one
        assert len(statements) == 2, statements
        # and it returned as soon as the last commit was heard
        finisher.join(10)
        assert returned - finisher.last_commit < WAKE_WITHIN_S


def test_wait_async_of_100_jobs_listens_instead_of_polling(pg_url: str, tmp_path: Path) -> None:
    # Given 100 running jobs that another connection finishes in 4 commits over ~1 s
    with client_on(pg_url, tmp_path) as client:
        ids = running_jobs(make_engine(pg_url), N_JOBS)
        finisher = Finisher(pg_url, ids)
        finisher.start()

        async def wait() -> tuple[list[uuid.UUID], float]:
            finisher.go.set()
            jobs = await client.wait_async(ids, timeout=60)
            return [job.id for job in jobs], time.monotonic()

        # When asyncio code waits for them all
        with statements_of(client) as statements:
            done, returned = asyncio.run(wait())
        # Then they are all back, with two statements in all, as soon as the last commit
        assert done == ids
        assert len(statements) == 2, statements
        finisher.join(10)
        assert returned - finisher.last_commit < WAKE_WITHIN_S


def test_concurrent_waits_share_one_listening_connection(pg_url: str, tmp_path: Path) -> None:
    # Given 40 running jobs, and a client's tenant view (as the API's callers have)
    engine = make_engine(pg_url)
    ids = running_jobs(engine, 40)
    finisher = Finisher(pg_url, ids)
    finisher.start()
    with client_on(pg_url, tmp_path) as client:
        view = client.as_tenant(None)

        async def waits() -> tuple[list[list[uuid.UUID]], int]:
            # When 40 waits (one per job, half through the view) run at once
            tasks = [
                asyncio.create_task((view if n % 2 else client).wait_async([i], timeout=60))
                for n, i in enumerate(ids)
            ]
            await asyncio.sleep(0.2)
            listening = await asyncio.to_thread(listening_backends, engine)
            finisher.go.set()
            return [[job.id for job in await task] for task in tasks], listening

        with statements_of(client) as statements:
            done, listening = asyncio.run(waits())
    # Then they held one LISTEN connection between them, and each read twice
    assert listening == 1
    assert done == [[i] for i in ids]
    assert len(statements) == 2 * len(ids)
    finisher.join(10)
    engine.dispose()


def test_blocking_waits_share_the_listener_with_the_loop_s_waits(
    pg_url: str, tmp_path: Path
) -> None:
    # Given 8 running jobs, and a client whose first blocking wait (on an event loop of its
    # own, closed since) started its listener
    engine = make_engine(pg_url)
    first, *ids = running_jobs(engine, 9)
    succeed(engine, [first])
    finisher = Finisher(pg_url, ids)
    finisher.start()
    with client_on(pg_url, tmp_path) as client:
        assert client.wait(first, timeout=60).status is JobStatus.SUCCEEDED

        def wait_blocking(job_id: uuid.UUID) -> list[Job]:
            return [client.wait(job_id, timeout=60)]

        async def waits() -> tuple[list[uuid.UUID], int]:
            # When an event loop waits for half of the jobs while threads wait for the other
            # half in blocking calls (as a server runs its sync routes)
            tasks = [
                asyncio.create_task(client.wait_async([i], timeout=60))
                if n % 2
                else asyncio.create_task(asyncio.to_thread(wait_blocking, i))
                for n, i in enumerate(ids)
            ]
            await asyncio.sleep(0.2)
            listening = await asyncio.to_thread(listening_backends, engine)
            finisher.go.set()
            return [job.id for task in tasks for job in await task], listening

        with statements_of(client) as statements:
            done, listening = asyncio.run(waits())
    # Then all of them listened on the one connection, and each read twice
    assert listening == 1
    assert done == ids
    assert len(statements) == 2 * len(ids), statements
    finisher.join(10)
    engine.dispose()


def test_a_blocking_wait_inside_a_coroutine_still_returns(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given 3 running jobs, which another connection finishes after ~1 s
    url = new_database("sqlite", request, tmp_path)
    with client_on(url, tmp_path) as client:
        ids = running_jobs(make_engine(url), 3)
        finisher = Finisher(url, ids)
        finisher.start()

        async def caller() -> list[uuid.UUID]:
            finisher.go.set()
            # When a coroutine calls the blocking wait (its loop is busy running it)
            return [job.id for job in client.wait(ids, timeout=60)]

        # Then the wait returns the jobs all the same
        assert asyncio.run(caller()) == ids
        finisher.join(10)


def test_a_wait_whose_listener_is_killed_polls_and_finishes(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a client waiting on PostgreSQL for 10 running jobs
    engine = make_engine(pg_url)
    ids = running_jobs(engine, 10)
    with client_on(pg_url, tmp_path) as client, caplog.at_level(logging.WARNING):
        result: list[list[object]] = []
        waiting = threading.Thread(target=lambda: result.append(client.wait(ids, timeout=30)))
        waiting.start()
        deadline = time.monotonic() + 10
        while listening_backends(engine) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # When its listening connection is killed, then the jobs finish
        with engine.begin() as conn:
            kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN cq_jobs'"
            assert conn.execute(text(kill)).scalars().all() == [True]
        time.sleep(0.3)
        succeed(engine, ids)
        waiting.join(30)
        # Then the wait polled and returned them, saying so in the log
        assert len(result) == 1 and len(result[0]) == len(ids)
        assert "lost the LISTEN connection" in caplog.text
    engine.dispose()


def test_wait_on_sqlite_polls(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Given 10 running jobs in SQLite, which another connection finishes after ~1 s
    url = new_database("sqlite", request, tmp_path)
    with client_on(url, tmp_path) as client:
        ids = running_jobs(make_engine(url), 10)
        finisher = Finisher(url, ids)
        finisher.start()
        # When the client waits for them
        with statements_of(client) as statements:
            finisher.go.set()
            done = client.wait(ids, timeout=60)
        # Then they are back, finished, after polls with a backoff (nothing to listen to)
        assert {job.status for job in done} == {JobStatus.SUCCEEDED}
        finisher.join(10)
        polls = [s for s in statements if "count(" in s.lower()]
        assert 4 <= len(polls) < 40, statements


def test_migration_0006_round_trips_on_postgres(postgres: PostgresCluster, pg_url: str) -> None:
    # Given a database at head, with the trigger
    config = alembic_config(pg_url)
    engine = make_engine(pg_url)
    trigger = text("SELECT count(*) FROM pg_trigger WHERE tgname = 'jobs_notify'")
    function = text("SELECT count(*) FROM pg_proc WHERE proname = 'cq_jobs_notify'")

    def installed() -> tuple[int, int]:
        with engine.connect() as conn:
            return conn.execute(trigger).scalar_one(), conn.execute(function).scalar_one()

    assert installed() == (1, 1)
    # When it goes down to 0005, then down to nothing, then up to head again
    command.downgrade(config, "0005")
    down = installed()
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    # Then 0005 had neither trigger nor function, and head has them back, and they notify
    assert down == (0, 0)
    assert installed() == (1, 1)
    ids = running_jobs(engine, 1)
    with psycopg.connect(dsn(postgres, pg_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        succeed(engine, ids)
        (notice,) = listener.notifies(timeout=10, stop_after=1)
    assert parse_notice(notice.payload) == JobNotice(ids[0], JobStatus.SUCCEEDED, 3)
    engine.dispose()


def test_migration_0006_does_nothing_on_sqlite(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given a SQLite database at head
    url = new_database("sqlite", request, tmp_path)
    config = alembic_config(url)
    # When it goes down to 0005 and up again
    command.downgrade(config, "0005")
    command.upgrade(config, "head")
    # Then it is at head, and its jobs still finish
    engine = make_engine(url)
    ids = running_jobs(engine, 1)
    succeed(engine, ids)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == ScriptDirectory.from_config(config).get_current_head()
        assert conn.execute(text("SELECT status FROM jobs")).scalar_one() == "succeeded"
    engine.dispose()

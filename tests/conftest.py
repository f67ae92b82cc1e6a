"""Session fixtures: a real redis-server, a real PostgreSQL cluster, the tiny model,
and real worker processes per database backend."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import delete

from completion_queue import (
    EmbeddedRedis,
    Settings,
    WorkerProcess,
    free_port,
    model_queues,
    queue_keys,
    queue_name,
    worker_env,
)
from db import JobRow, make_engine, make_session_factory, upgrade
from producer.client import CompletionClient
from tests.services import PostgresCluster

BACKENDS = ["sqlite", "postgresql"]

# The greedy equality tests compare workers' texts with a float32 reference (tests/reference.py),
# while CQ_DTYPE=auto is bfloat16 on a CPU where bf16 measures faster. Set before any Settings is
# built, this pins float32 for every Settings the tests build (worker_env passes it on) and every
# child process, which inherits os.environ; tests/integration/test_bf16_worker.py runs bf16.
os.environ.setdefault("CQ_DTYPE", "float32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put each test in one of two lanes, which `make test` runs side by side (pytest-xdist).

    The waiting lane holds the tests whose time goes to default timers rather than the CPU:
    every chaos test (a fault, then the recovery the defaults promise) and those marked
    ``waits``. They run beside the rest, one test at a time in each lane, so the suite takes
    about as long as its longer lane; without ``-n`` the lanes mean nothing.
    """
    if not config.pluginmanager.hasplugin("xdist"):
        return  # a venv without it (vLLM's) runs one lane
    chaos = Path(__file__).resolve().parent / "chaos"
    for item in items:
        waiting = item.path.is_relative_to(chaos) or item.get_closest_marker("waits")
        item.add_marker(pytest.mark.xdist_group("waiting" if waiting else "main"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2-style model, built once per run: the lanes of `make test` share it."""
    from engine.tiny import ensure_tiny_model

    # Under pytest-xdist each lane has its own base temp; their parent is the run's.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return ensure_tiny_model(shared / "models" / "tiny-gpt2")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server on a free port."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL cluster on a free port."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


def new_database(backend: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    """Create an empty, migrated database on ``backend``; return its URL."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp / f'cq-{uuid.uuid4().hex[:8]}.db'}"
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.create_database(f"cq_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    return url


def worker_settings(
    request: pytest.FixtureRequest,
    redis_port: int,
    redis_db: int,
    model: Path,
    tmp: Path,
    database_url: str | None = None,
    **overrides: Any,
) -> Settings:
    """Settings of a worker serving ``model`` on its own Redis db, and on a new SQLite
    database under ``tmp`` unless ``database_url``."""
    return Settings(
        broker_url=f"redis://127.0.0.1:{redis_port}/{redis_db}",
        database_url=database_url or new_database("sqlite", request, tmp),
        data_dir=tmp,
        model=str(model),
        **overrides,
    )


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database on each backend."""
    return new_database(request.param, request, tmp_path)


@dataclass
class Stack:
    """A running pipeline: broker, database, one worker process, and their settings."""

    backend: str
    settings: Settings
    worker: WorkerProcess
    redis: redis.Redis

    def client(self) -> CompletionClient:
        """Return a new client on this stack."""
        return CompletionClient(settings=self.settings)


_REDIS_DB = {"sqlite": 1, "postgresql": 2}


@pytest.fixture(scope="session", params=BACKENDS)
def stack(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """One worker process with the tiny model per backend (each on its own Redis db)."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"stack-{backend}")
    broker = f"redis://127.0.0.1:{redis_server.port}/{_REDIS_DB[backend]}"
    settings = Settings(
        broker_url=broker,
        database_url=new_database(backend, request, tmp),
        data_dir=tmp,
        model=str(tiny_model),
        batch_size=16,
        batch_wait_ms=20,
        metrics_port=free_port(),
    )
    worker = WorkerProcess(worker_env(settings), tmp / "worker.log").start().wait_ready()
    client = redis.Redis.from_url(broker)
    yield Stack(backend=backend, settings=settings, worker=worker, redis=client)
    worker.stop()
    client.close()


@pytest.fixture
def client(stack: Stack) -> Iterator[CompletionClient]:
    """A client on a clean database (every row deleted before the test)."""
    engine = make_engine(stack.settings.resolved_database_url())
    with make_session_factory(engine).begin() as session:
        session.execute(delete(JobRow))
    engine.dispose()
    with stack.client() as c:
        yield c


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> object:
    """The tiny model loaded in the test process, for direct ``generate`` comparisons."""
    from tests.reference import Reference

    return Reference(tiny_model)


def until(condition: Callable[[], Any], timeout_s: float = 60) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


def purge_queue(client: redis.Redis, model: str) -> None:
    """Delete every message waiting for ``model``: in its tenants' lane queues and released."""
    names = model_queues(client, queue_name(model)).values()
    client.delete(*[key for name in names for key in queue_keys(name)])

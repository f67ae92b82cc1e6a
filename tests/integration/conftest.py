"""Fixtures of the integration tests: a webhook endpoint, a worker whose every step is
slowed, and a worker at the default settings."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from completion_queue import (
    TINY_MODEL_NAME,
    EmbeddedRedis,
    Settings,
    WorkerProcess,
    free_port,
    queue_name,
    worker_env,
)
from db import upgrade
from tests.conftest import Stack

#: The Redis database of the shared server where :func:`defaults` runs (no other fixture's).
_DEFAULTS_REDIS_DB = 14


@pytest.fixture(scope="module")
def defaults(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """A worker at the default settings, on its own Redis database and SQLite file: every
    scheduling setting (batch size, lookahead, wait, prefetch) at its default, only where
    it finds Redis, the database and the model set. One per module."""
    tmp = tmp_path_factory.mktemp("defaults")
    broker = f"redis://127.0.0.1:{redis_server.port}/{_DEFAULTS_REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(
        broker_url=broker,
        database_url=f"sqlite:///{tmp / 'jobs.db'}",
        data_dir=tmp,
        model=str(tiny_model),
    )
    upgrade(settings.resolved_database_url())
    worker = WorkerProcess(worker_env(settings), tmp / "worker.log").start().wait_ready()
    yield settings
    worker.stop()


@dataclass
class HookServer:
    """A local HTTP endpoint that records webhook POSTs and answers with scripted codes."""

    codes: list[int]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def hooks() -> Iterator[tuple[HookServer, str]]:
    """A webhook endpoint on loopback that answers 500 once, then 200; and its URL."""
    state = HookServer(codes=[500, 200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((dict(self.headers), body))
            self.send_response(state.codes.pop(0) if state.codes else 200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


#: The fault plugins, put on a worker's PYTHONPATH.
FAULTS_DIR = Path(__file__).resolve().parent.parent / "faults"
#: Seconds each forward pass of the slowed worker sleeps: 160 tokens take 3 s or more.
CRAWL_S = 0.02


@pytest.fixture
def user_data_dir(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's ``CQ_DATA_DIR`` with the default model, tiny-gpt2, built in it: where
    `cq bench` and the benchmarks find it (their workers get data dirs of their own)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / TINY_MODEL_NAME).symlink_to(tiny_model, target_is_directory=True)
    monkeypatch.setenv("CQ_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def slow_model(
    stack: Stack, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The tiny model under another name, served by a worker whose every step is slowed."""
    tmp = tmp_path_factory.mktemp("slow-worker")
    name = tmp / "slow-tiny"
    name.symlink_to(tiny_model, target_is_directory=True)
    settings = stack.settings.model_copy(
        update={"model": str(name), "data_dir": tmp, "metrics_port": free_port()}
    )
    env = {
        **worker_env(settings),
        "CQ_TEST_FAULTS": json.dumps({"crawl_s": CRAWL_S}),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH")) if p
        ),
    }
    worker = WorkerProcess(env, tmp / "worker.log").start().wait_ready()
    yield str(name)
    worker.stop()
    keys = stack.redis.keys(queue_name(str(name)) + "*")
    if keys:
        stack.redis.delete(*keys)

"""Fixtures for faults done for real: workers of a test's own, on its own Redis db and database.

Chaos never disturbs the shared stack: each test gets an empty Redis db (5) and
its own SQLite file, and every worker it starts is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from completion_queue import (
    EmbeddedRedis,
    RedisTLS,
    Settings,
    WorkerProcess,
    queue_depth,
    queue_name,
    stop_workers,
    worker_env,
)
from producer.client import CompletionClient
from tests.conftest import new_database

CHAOS_REDIS_DB = 5
FAULTS_DIR = Path(__file__).resolve().parent.parent / "faults"


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def node_name(worker: WorkerProcess) -> str:
    """The Celery node name ``cq worker`` gives itself (see workers.main)."""
    return worker.nodename


def kill_worker(worker: WorkerProcess) -> None:
    """SIGKILL a worker's main process and its model process, as a lost machine would."""
    pids = [worker.pid, *worker.pool_pids()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert worker.process is not None
    worker.process.wait(30)


class Chaos:
    """A test's own broker db, database and workers."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []
        self.redis = redis.Redis.from_url(settings.broker_url or "")

    def use_broker(self, url: str) -> None:
        """Point this test's workers and clients at another broker."""
        self.settings = self.settings.model_copy(update={"broker_url": url})
        self.redis.close()
        self.redis = redis.Redis.from_url(url)

    def start_worker(
        self, *, faults: dict[str, Any] | None = None, ready: bool = True, **overrides: Any
    ) -> WorkerProcess:
        """Start a worker on these settings (plus ``overrides``); ``faults``: CQ_TEST_FAULTS."""
        env = worker_env(self.settings.model_copy(update=overrides))
        if faults:
            env["CQ_TEST_FAULTS"] = json.dumps(faults)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH")) if p
            )
        log = self.tmp / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess(env, log).start()
        self.workers.append(worker)
        return worker.wait_ready() if ready else worker

    def client(self, **overrides: Any) -> CompletionClient:
        """A client on this test's broker and database."""
        return CompletionClient(settings=self.settings.model_copy(update=overrides))

    def queued_messages(self) -> int:
        """Messages waiting in the model's queue (every priority step)."""
        return queue_depth(self.redis, queue_name(self.settings.model))

    def unacked_messages(self) -> int:
        """Messages delivered to a worker and not acknowledged yet."""
        return int(self.redis.hlen("unacked"))  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop every worker and empty the Redis db."""
        stop_workers([worker for worker in self.workers if worker.alive()], timeout_s=20)
        self.redis.flushdb()
        self.redis.close()


# X.509 extensions strict enough for Python's VERIFY_X509_STRICT (the default from 3.13).
CERT_EXTENSIONS = """
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_certificates(directory: Path) -> RedisTLS:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client one (``openssl``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "extensions.cnf"
    config.write_text(CERT_EXTENSIONS)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        *key,
        "-days",
        "2",
        "-subj",
        "/CN=cq-test-ca",
        "-config",
        str(config),
        "-extensions",
        "ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    for name in ("server", "client"):
        openssl(
            "req",
            "-new",
            *key,
            "-subj",
            f"/CN={name}",
            "-config",
            str(config),
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(config),
            "-extensions",
            "leaf",
            "-out",
            f"{name}.crt",
        )
    return RedisTLS(
        ca_file=directory / "ca.crt",
        cert_file=directory / "server.crt",
        key_file=directory / "server.key",
        client_cert_file=directory / "client.crt",
        client_key_file=directory / "client.key",
    )


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> RedisTLS:
    """TLS files for a redis-server on 127.0.0.1, with a client certificate (mutual TLS)."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start redis-servers of this test's own (``EmbeddedRedis`` options); stopped at the end."""
    servers: list[EmbeddedRedis] = []

    def start(**options: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(tmp_path / f"own-redis-{len(servers)}", **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def chaos(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> Iterator[Chaos]:
    """A test's own Redis db and SQLite database; start workers with ``chaos.start_worker()``."""
    settings = Settings(
        broker_url=f"redis://127.0.0.1:{redis_server.port}/{CHAOS_REDIS_DB}",
        database_url=new_database("sqlite", request, tmp_path),
        data_dir=tmp_path,
        model=str(tiny_model),
        batch_size=8,
        batch_lookahead=1,
        batch_wait_ms=20,
    )
    env = Chaos(settings, tmp_path)
    env.redis.flushdb()
    yield env
    env.close()

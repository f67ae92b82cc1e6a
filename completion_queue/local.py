"""Local processes for one machine: the embedded broker and worker child processes.

The CLI (``cq up``, ``cq demo``), the benchmark and the tests start them. Workers
run in their own processes (``python -m workers``) configured by ``CQ_*``
variables, exactly as on a real deployment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import psutil

from completion_queue.celery_app import broker_url_file
from completion_queue.constants import WORKER_CONSUMING_LINE, WORKER_READY_LINE
from completion_queue.errors import CompletionError
from completion_queue.redis_server import EmbeddedRedis
from completion_queue.settings import Settings


@contextlib.contextmanager
def embedded_broker(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a broker: ``CQ_BROKER_URL``, else an embedded redis-server.

    The embedded server's URL is published in the data directory while it runs,
    so other ``cq`` commands on this machine find it.
    """
    if settings.broker_url:
        yield settings
        return
    with EmbeddedRedis(settings.data_dir / "redis") as server:
        published = broker_url_file(settings)
        published.write_text(server.url)
        try:
            yield settings.model_copy(update={"broker_url": server.url})
        finally:
            published.unlink(missing_ok=True)


def worker_env(settings: Settings) -> dict[str, str]:
    """Return the ``CQ_*`` variables that give a child worker these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            env[f"CQ_{name.upper()}"] = ",".join(map(str, value))
        elif value is not None:
            env[f"CQ_{name.upper()}"] = str(value)
    return env


def default_nodename(pid: int) -> str:
    """Return the Celery node name a worker takes unless told otherwise: ``cq<pid>@<host>``."""
    return f"cq{pid}@{socket.gethostname()}"


class WorkerProcess:
    """A ``python -m workers`` child process with its log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The worker's process id."""
        assert self.process is not None
        return self.process.pid

    @property
    def nodename(self) -> str:
        """The worker's Celery node name (the ``worker`` column of the jobs it runs)."""
        return default_nodename(self.pid)

    def start(self) -> WorkerProcess:
        """Start the worker process (returns at once; see :meth:`wait_ready`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def log_text(self) -> str:
        """Return what this process wrote to its log so far."""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0) -> WorkerProcess:
        """Block until the worker has loaded its model and consumes its queue."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_text()
            if WORKER_READY_LINE in text and WORKER_CONSUMING_LINE in text:
                return self
            if self.process.poll() is not None:
                raise CompletionError(
                    f"worker exited with code {self.process.returncode} before it was ready; "
                    f"last log lines:\n{_tail(self.log_text())}"
                )
            time.sleep(0.1)
        raise CompletionError(
            f"worker not ready after {timeout_s}s; last log lines:\n{_tail(self.log_text())}"
        )

    def pool_pids(self) -> list[int]:
        """The worker's pool processes: the one that holds the model."""
        return child_pids(self.pid)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL after ``timeout_s``; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        return self.process.returncode

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    """Return the ids of the child processes of ``pid`` (none once it has exited)."""
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def rss_mb(pid: int) -> float:
    """Return the resident memory of process ``pid`` in MB (NaN once it has exited)."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])

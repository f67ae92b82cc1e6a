"""Local processes for one machine: the embedded broker and worker child processes.

The CLI (``cq up``, ``cq demo``), the benchmark and the tests start them. Workers
run in their own processes (``python -m workers``) configured by ``CQ_*``
variables, exactly as on a real deployment.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

import psutil

from completion_queue.celery_app import (
    broker_answers,
    broker_lock_file,
    broker_url_file,
    published_broker_url,
)
from completion_queue.constants import TINY_MODEL_NAME, WORKER_CONSUMING_LINE, WORKER_READY_LINE
from completion_queue.errors import CompletionError, ConfigError, EmbeddedRedisError
from completion_queue.redis_server import EmbeddedRedis, stop_with_parent
from completion_queue.settings import Settings, redact_url

#: The signals that stop ``cq up`` and ``cq demo``: kill, Ctrl-C, and the terminal closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when a stop signal (SIGTERM, SIGINT, SIGHUP) arrives."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[signal.Signals] = STOP_SIGNALS) -> Iterator[None]:
    """Raise :class:`Stopped` on the first of ``signals``, and ignore the rest until the end.

    Every ``with`` the exception unwinds stops its process (worker, then broker) and
    removes its files; a second signal must not cut that short. A signal ignored
    already (``nohup``, a background job) stays ignored. Main thread only.
    """
    previous = {sig: signal.getsignal(sig) for sig in signals}
    taken = [sig for sig, handler in previous.items() if handler != signal.SIG_IGN]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for sig in taken:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in taken:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig in taken:
            signal.signal(sig, previous[sig] or signal.SIG_DFL)


@contextlib.contextmanager
def embedded_broker(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a broker: ``CQ_BROKER_URL``, else an embedded redis-server.

    The embedded server's URL is published in the data directory while it runs,
    so other ``cq`` commands on this machine find it. One embedded broker per data
    directory: a second is refused (:class:`EmbeddedRedisError`) while the first runs.
    """
    if settings.broker_url:
        yield settings
        return
    published = broker_url_file(settings)
    with _sole_broker(settings), EmbeddedRedis(published.parent) as server:
        # Written whole or not at all: a reader never finds it empty.
        partial = published.with_name(f".{published.name}.{os.getpid()}")
        partial.write_text(server.url)
        partial.replace(published)
        try:
            yield settings.model_copy(update={"broker_url": server.url})
        finally:
            published.unlink(missing_ok=True)


@contextlib.contextmanager
def _sole_broker(settings: Settings) -> Iterator[None]:
    """Hold the data directory's broker lock (the kernel drops it if this process dies).

    Refused while another ``cq up`` / ``cq demo`` holds it, or while the broker file
    names a server that still answers though its owner is gone (killed with SIGKILL).
    """
    published = broker_url_file(settings)
    published.parent.mkdir(parents=True, exist_ok=True)
    with broker_lock_file(settings).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            running = redact_url(published_broker_url(settings)) or "a broker still starting"
            raise EmbeddedRedisError(
                f"another `cq up` or `cq demo` (pid {owner}) runs the embedded broker of "
                f"{settings.data_dir} ({running}): stop it first, or set CQ_DATA_DIR to another "
                "directory; `cq worker` adds a worker to it"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        url = published_broker_url(settings)
        if url and broker_answers(url):
            raise EmbeddedRedisError(
                f"{published} names a broker that still answers at {redact_url(url)}, but no "
                "`cq up` or `cq demo` owns it (one was killed): stop that redis-server, or "
                "set CQ_BROKER_URL to use it"
            )
        yield


def worker_env(settings: Settings) -> dict[str, str]:
    """Return the ``CQ_*`` variables that give a child worker these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            env[f"CQ_{name.upper()}"] = ",".join(map(str, value))
        elif value is not None:
            env[f"CQ_{name.upper()}"] = str(value)
    return env


def worker_placement(
    settings: Settings, count: int, *, gpus: Sequence[str], cores: int
) -> list[dict[str, str]]:
    """Return what each of ``count`` workers on one host adds to :func:`worker_env`
    (``cq up --workers``).

    One worker: nothing, as ever. On a CUDA host (``gpus``: the ids that
    ``CUDA_VISIBLE_DEVICES`` may name; empty on CPU or with ``device=cpu``), worker ``i``
    sees GPU ``gpus[i]`` alone, and more workers than GPUs are refused. On CPU they share
    the ``cores``: each gets ``CQ_TORCH_THREADS`` = max(1, (cores - 1) // count) unless it
    is set.
    """
    if count < 1:
        raise ConfigError(f"--workers must be >= 1, got {count}")
    if count == 1:
        return [{}]
    if settings.device == "cpu" or not gpus:
        threads = settings.torch_threads or max(1, (cores - 1) // count)
        return [{"CQ_TORCH_THREADS": str(threads)} for _ in range(count)]
    if settings.device not in ("auto", "cuda"):
        raise ConfigError(
            f"--workers puts one worker on each GPU: CQ_DEVICE must be auto or cuda, "
            f"got {settings.device!r}"
        )
    if count > len(gpus):
        raise ConfigError(f"--workers must be at most the {len(gpus)} GPU(s) here, got {count}")
    return [{"CUDA_VISIBLE_DEVICES": gpus[i]} for i in range(count)]


def default_nodename(pid: int, model: str) -> str:
    """Return the Celery node name a worker takes unless told otherwise: ``cq<pid>-<model>@<host>``.

    The model's last path part is in it, so Flower's worker list says what each serves.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"cq{pid}-{slug or 'model'}@{socket.gethostname()}"


class WorkerProcess:
    """A ``python -m workers`` child process with its log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @property
    def pid(self) -> int:
        """The worker's process id."""
        assert self.process is not None
        return self.process.pid

    @property
    def nodename(self) -> str:
        """The worker's Celery node name (the ``worker`` column of the jobs it runs)."""
        return default_nodename(self.pid, self.env.get("CQ_MODEL") or TINY_MODEL_NAME)

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
                preexec_fn=stop_with_parent(),
            )
        self._terminated = False
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

    def terminate(self) -> None:
        """Ask for a warm shutdown: one SIGTERM, however often this is called."""
        if self.process is not None and self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL after ``timeout_s``; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Its pool processes too: killed, the worker could not stop them itself.
                for pid in [*child_pids(self.pid), self.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
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


def stop_workers(workers: Sequence[WorkerProcess], timeout_s: float = 30.0) -> None:
    """Stop ``workers`` together: each warm shutdown takes seconds, mostly waiting."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop(timeout_s)


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

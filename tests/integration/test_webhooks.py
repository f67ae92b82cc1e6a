"""Webhook delivery against real endpoints and a real database.

Callbacks reach public addresses only; no receiver (a poison URL, a slow one, one
that never stops sending) holds the other deliveries back or the API's memory.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.webhooks import WebhookDispatcher
from completion_queue import Settings
from db import (
    JobRow,
    NewJob,
    WebhookStatus,
    cancel_job,
    create_jobs,
    get_job,
    make_engine,
    make_session_factory,
)
from db.snapshots import Job
from tests.conftest import new_database, until
from tests.integration.conftest import HookServer


@pytest.mark.parametrize("allow_private", [False, True])
def test_a_callback_name_that_resolves_inward_is_never_posted_to(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hooks: tuple[HookServer, str],
    allow_private: bool,
) -> None:
    server, url = hooks
    server.codes = []
    # Given a callback URL whose host is a name (this machine's), not a literal address
    host = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    assert addresses, f"{host} does not resolve"
    callback = url.replace("127.0.0.1", host)
    database = new_database("sqlite", request, tmp_path)
    sessions = make_session_factory(make_engine(database))
    with sessions.begin() as session:
        ((job, _),) = create_jobs(
            session, jobs=[NewJob(model="m", prompt="p", params={}, callback_url=callback)]
        )
        cancel_job(session, job_id=job.id)  # finished: its webhook is due
    settings = Settings(
        database_url=database, webhook_secret="s", webhook_allow_private=allow_private
    )
    dispatcher = WebhookDispatcher(settings, sessions)
    # When the dispatcher runs, with CQ_WEBHOOK_ALLOW_PRIVATE off or on
    assert dispatcher.deliver_due() == 1
    assert dispatcher.deliver_due() == 0  # nothing due again: not retried
    with sessions() as session:
        done = get_job(session, job_id=job.id)
    assert done is not None and done.webhook_attempts == 1
    if allow_private:
        # Then, allowed, the endpoint (reachable under that name) gets it
        assert done.webhook_status is WebhookStatus.DELIVERED
        assert len(server.received) == 1
        assert server.received[0][0]["Host"] == urlsplit(callback).netloc
    else:
        # Then, by default, it fails for good, naming the address, and nothing was sent
        assert done.webhook_status is WebhookStatus.FAILED
        assert done.webhook_error is not None
        assert "not public" in done.webhook_error and host in done.webhook_error
        assert "CQ_WEBHOOK_ALLOW_PRIVATE" in done.webhook_error
        assert server.received == []


@dataclass
class RawReceiver:
    """A TCP endpoint that reads one request per connection, then answers with ``reply``."""

    reply: Callable[[socket.socket], None]
    connections: int = 0
    open: int = 0
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def raw_receivers() -> Iterator[
    Callable[[Callable[[socket.socket], None]], tuple[RawReceiver, str]]
]:
    """Start misbehaving webhook receivers on loopback; yield a factory of (receiver, URL)."""
    servers: list[socketserver.ThreadingTCPServer] = []

    def start(reply: Callable[[socket.socket], None]) -> tuple[RawReceiver, str]:
        receiver = RawReceiver(reply)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with receiver.lock:
                    receiver.connections += 1
                    receiver.open += 1
                try:
                    read_request(self.request)
                    receiver.reply(self.request)
                except OSError:
                    pass  # the dispatcher hung up: what these receivers wait for
                finally:
                    with receiver.lock:
                        receiver.open -= 1

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return receiver, f"http://127.0.0.1:{server.server_address[1]}/hook"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def read_request(conn: socket.socket) -> None:
    """Read one HTTP request with a Content-Length body from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)


def finished_jobs(sessions: sessionmaker[Session], urls: list[str]) -> list[uuid.UUID]:
    """Store one finished job per callback URL, as any worker would, unchecked; their ids."""
    ids = []
    for url in urls:
        with sessions.begin() as session:
            ((job, _),) = create_jobs(
                session, jobs=[NewJob(model="m", prompt="p", params={}, callback_url=url)]
            )
            cancel_job(session, job_id=job.id)  # finished: its webhook is due
        ids.append(job.id)
    return ids


def read(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with sessions() as session:
        job = get_job(session, job_id=job_id)
    assert job is not None
    return job


def sqlite_sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, sessionmaker[Session]]:
    database = new_database("sqlite", request, tmp_path)
    return database, make_session_factory(make_engine(database))


def test_a_poison_url_fails_alone_and_the_good_ones_are_delivered(
    request: pytest.FixtureRequest, tmp_path: Path, hooks: tuple[HookServer, str]
) -> None:
    server, url = hooks
    server.codes = []
    database, sessions = sqlite_sessions(request, tmp_path)
    # Given URLs stored before the submit check, each of which raised inside delivery
    poison = ["http://" + "a" * 64 + ".com/", "http://a..b/", "http://x/\n", "http://xn--zz.com/"]
    good_first, *bad, good_last = finished_jobs(sessions, [url, *poison, url])
    settings = Settings(database_url=database, webhook_secret="s", webhook_allow_private=True)
    dispatcher = WebhookDispatcher(settings, sessions)
    # When the dispatcher runs
    assert dispatcher.deliver_due() == 6
    # Then the good ones were delivered, each poison one failed for good after one attempt
    assert len(server.received) == 2
    for job_id in (good_first, good_last):
        assert read(sessions, job_id).webhook_status is WebhookStatus.DELIVERED
    for job_id in bad:
        job = read(sessions, job_id)
        assert job.webhook_status is WebhookStatus.FAILED and job.webhook_attempts == 1
        assert job.webhook_error is not None and job.webhook_error.startswith("callback_url ")
    assert dispatcher.deliver_due() == 0


def test_attempts_are_bounded_when_claimed_even_if_a_dispatcher_died_mid_delivery(
    request: pytest.FixtureRequest, tmp_path: Path, hooks: tuple[HookServer, str]
) -> None:
    server, url = hooks
    database, sessions = sqlite_sessions(request, tmp_path)
    settings = Settings(
        database_url=database,
        webhook_secret="s",
        webhook_allow_private=True,
        webhook_max_attempts=3,
    )
    # Given a webhook whose last attempt was claimed by a dispatcher that then died
    (job_id,) = finished_jobs(sessions, [url])
    with sessions.begin() as session:
        session.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(webhook_attempts=3, webhook_next_at=None)
        )
    # When a dispatcher looks for due webhooks
    assert WebhookDispatcher(settings, sessions).deliver_due() == 0
    # Then it is failed, not tried a fourth time
    job = read(sessions, job_id)
    assert job.webhook_status is WebhookStatus.FAILED and job.webhook_attempts == 3
    assert job.webhook_error == "no answer recorded after 3 attempts"
    assert server.received == []


@pytest.mark.waits
def test_a_slow_receiver_takes_one_slot_and_is_cut_off_at_the_default_deadline(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hooks: tuple[HookServer, str],
    raw_receivers: Callable[[Callable[[socket.socket], None]], tuple[RawReceiver, str]],
) -> None:
    server, url = hooks
    server.codes = []

    def drip(conn: socket.socket) -> None:
        # A byte a second, of a body that never ends: every read is quick, the answer never is
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        for _ in range(120):
            conn.sendall(b"x")
            time.sleep(1)

    slow, slow_url = raw_receivers(drip)
    database, sessions = sqlite_sessions(request, tmp_path)
    settings = Settings(database_url=database, webhook_secret="s", webhook_allow_private=True)
    assert settings.webhook_timeout_s == 10  # the default deadline
    dispatcher = WebhookDispatcher(settings, sessions)
    dispatcher.start()
    try:
        # Given a slow receiver's job, then good ones that finish while it is being delivered
        (slow_job,) = finished_jobs(sessions, [slow_url])
        until(lambda: slow.open == 1, timeout_s=10)
        started = time.monotonic()
        good = finished_jobs(sessions, [url] * 3)
        # Then the good ones are delivered while the slow one is still in flight
        until(lambda: len(server.received) == 3, timeout_s=5)
        assert slow.open == 1 and read(sessions, slow_job).webhook_error is None
        # And the slow one is cut off at the deadline, although no single read timed out
        job = until(lambda: (j := read(sessions, slow_job)).webhook_error and j, timeout_s=20)
        assert "no complete answer within 10s (CQ_WEBHOOK_TIMEOUT_S)" in job.webhook_error
        assert job.webhook_status is WebhookStatus.PENDING  # retried later, with backoff
        assert time.monotonic() - started < 12
    finally:
        dispatcher.stop()
    for job_id in good:
        assert read(sessions, job_id).webhook_status is WebhookStatus.DELIVERED


def test_a_receiver_that_never_stops_sending_is_cut_off_with_bounded_memory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    raw_receivers: Callable[[Callable[[socket.socket], None]], tuple[RawReceiver, str]],
) -> None:
    chunk = b"x" * 65536

    def endless_headers(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            conn.sendall(b"X-More: " + chunk + b"\r\n")

    def endless_body(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            conn.sendall(b"10000\r\n" + chunk + b"\r\n")

    receivers = [raw_receivers(endless_headers), raw_receivers(endless_body)]
    database, sessions = sqlite_sessions(request, tmp_path)
    settings = Settings(
        database_url=database,
        webhook_secret="s",
        webhook_allow_private=True,
        webhook_max_attempts=1,
    )
    headers_job, body_job = finished_jobs(sessions, [url for _, url in receivers])
    # When both are delivered
    tracemalloc.start()
    started = time.monotonic()
    try:
        assert WebhookDispatcher(settings, sessions).deliver_due() == 2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then each failed, long before the deadline, having read a bounded amount
    assert time.monotonic() - started < 5
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB held while reading"
    job = read(sessions, headers_job)
    assert job.webhook_status is WebhookStatus.FAILED
    assert job.webhook_error is not None and "RemoteProtocolError" in job.webhook_error
    job = read(sessions, body_job)
    assert job.webhook_status is WebhookStatus.FAILED
    assert job.webhook_error == "HTTP 500: " + "x" * 200
    for receiver, _ in receivers:
        until(lambda receiver=receiver: receiver.open == 0, timeout_s=5)  # hung up on

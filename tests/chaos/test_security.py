"""JSON only on the wire, passwords never in a log line or an error, TLS that verifies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from flower.utils.broker import Broker
from kombu import Connection

from completion_queue import (
    TASK_GENERATE,
    BrokerUnavailable,
    ConfigError,
    EmbeddedRedis,
    RedisTLS,
    lane_queue,
    queue_name,
    worker_env,
)
from db import JobStatus
from tests.chaos.conftest import Chaos, wait_for

PASSWORD = "s3cret-Pa55-word"


class Evil:
    """Unpickling this creates a file: proof that a pickle ran, if the file exists."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_pickled_message_is_refused_and_never_executed(chaos: Chaos, tmp_path: Path) -> None:
    worker = chaos.start_worker()
    marker = tmp_path / "pickle-ran"
    with chaos.client() as client:
        # Given a finished job
        job = client.wait(client.submit("Once upon a time", max_new_tokens=4), timeout=60)
        # When someone publishes a pickle-serialized task for it on the model's queue
        queue = queue_name(chaos.settings.model)
        with Connection(chaos.settings.broker_url) as conn:
            conn.Producer().publish(
                ([Evil(marker)], {}, {}),
                routing_key=queue,
                serializer="pickle",
                headers={"task": TASK_GENERATE, "id": str(job.id), "lang": "py"},
            )
        # Then the worker refuses it: nothing is unpickled, no job runs again
        wait_for(lambda: "pickle" in worker.log_text(), 30, "the refusal in the log")
        wait_for(lambda: chaos.queued_messages() + chaos.unacked_messages() == 0, 30, "drain")
        assert not marker.exists()
        assert client.get(job.id).attempts == 1
        # and the worker goes on serving
        after = client.wait(client.submit("after", max_new_tokens=4), timeout=60)
        assert after.status is JobStatus.SUCCEEDED
    assert "ContentDisallowed" in worker.log_text() or "Refusing" in worker.log_text()


def test_redis_passwords_work_and_never_reach_logs_or_errors(
    own_redis: Callable[..., EmbeddedRedis], chaos: Chaos
) -> None:
    locked = own_redis(password=PASSWORD)
    assert PASSWORD in locked.url
    chaos.use_broker(locked.url)
    # Given a worker and a client on a Redis that requires a password
    worker = chaos.start_worker()
    with chaos.client() as client:
        done = client.wait(client.submit("Hello", max_new_tokens=4), timeout=60)
    assert done.status is JobStatus.SUCCEEDED
    # Then the worker's log never holds the password
    assert PASSWORD not in worker.log_text()
    # and neither does a CLI error on a broker it cannot reach
    unreachable = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    env = {**os.environ, **worker_env(chaos.settings), "CQ_BROKER_URL": unreachable}
    failed = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "Hello"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode != 0
    assert "could not queue" in failed.stderr and ":***@" in failed.stderr
    assert PASSWORD not in failed.stderr + failed.stdout


def test_tls_only_redis_serves_workers_and_refuses_clients_that_do_not_trust_it(
    own_redis: Callable[..., EmbeddedRedis], certificates: RedisTLS, chaos: Chaos
) -> None:
    # Given a redis-server that speaks TLS only (no plain port) and requires a password
    tls = replace(certificates, client_cert_file=None, client_key_file=None)
    server = own_redis(password=PASSWORD, tls=tls)
    assert server.url.startswith(f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs=")
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD, socket_timeout=5).ping()
    # When a real worker and a client use it through CQ_BROKER_URL=rediss://...?ssl_ca_certs=
    chaos.use_broker(server.url)
    worker = chaos.start_worker()
    with chaos.client() as client:
        jobs = client.submit_many([{"prompt": f"Hello {i}", "max_new_tokens": 4} for i in range(6)])
        done = client.wait(jobs, timeout=60)
        # Then every job succeeds, and the worker's log never holds the password
        assert [job.status for job in done] == [JobStatus.SUCCEEDED] * 6
        assert "Connected to rediss://:**@127.0.0.1" in worker.log_text()
        assert PASSWORD not in worker.log_text()
        # and a client that does not trust the server's CA (system CAs only) is refused
        untrusted = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0"
        with (
            chaos.client(broker_url=untrusted) as stranger,
            pytest.raises(BrokerUnavailable, match="certificate verify failed") as refused,
        ):
            stranger.submit("Hello", max_new_tokens=4)
        assert PASSWORD not in str(refused.value) and ":***@" in str(refused.value)
        # and a client whose TLS options are wrong is told which, before any row is written
        wrong = f"{untrusted}?ssl_cert_reqs=maybe"
        with (
            chaos.client(broker_url=wrong) as confused,
            pytest.raises(ConfigError, match="ssl_cert_reqs must be one of"),
        ):
            confused.submit("Hello", max_new_tokens=4)
        # with no job row left behind and nothing queued
        assert len(client.list(limit=100)) == 6
    assert chaos.queued_messages() + chaos.unacked_messages() == 0


def test_mutual_tls_refuses_clients_without_a_certificate(
    own_redis: Callable[..., EmbeddedRedis], certificates: RedisTLS, chaos: Chaos
) -> None:
    # Given a TLS-only redis-server that requires client certificates
    server = own_redis(tls=certificates)
    assert "ssl_certfile=" in server.url and "ssl_keyfile=" in server.url
    chaos.use_broker(server.url)
    # When a client that trusts the CA but has no certificate submits, it is refused
    anonymous = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certificates.ca_file}"
    with chaos.client(broker_url=anonymous) as anonymous_client, pytest.raises(BrokerUnavailable):
        anonymous_client.submit("Hello", max_new_tokens=4)
    # Then only the client with its certificate gets its job stored and queued
    with chaos.client() as client:
        job = client.submit("Hello", max_new_tokens=4)
        assert [row.id for row in client.list(limit=100)] == [job.id]
        assert client.get(job.id).status is JobStatus.QUEUED
        # and Flower's broker view (which reads TLS options from the app, not the URL) sees it
        app = client.app
        with app.connection() as conn:
            flower_broker = Broker(
                conn.as_uri(include_password=True),
                broker_options=app.conf.broker_transport_options,
                broker_use_ssl=app.conf.broker_use_ssl,
            )
        # (no worker runs: the job waits in its lane queue, not yet released to the model's)
        queue = lane_queue(queue_name(chaos.settings.model), None, "interactive")
        assert asyncio.run(flower_broker.queues([queue])) == [{"name": queue, "messages": 1}]
    assert chaos.queued_messages() == 1

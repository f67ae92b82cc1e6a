"""Webhook delivery against a real endpoint and database: callbacks reach public addresses only."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from api.webhooks import WebhookDispatcher
from completion_queue import Settings
from db import (
    NewJob,
    WebhookStatus,
    cancel_job,
    create_jobs,
    get_job,
    make_engine,
    make_session_factory,
)
from tests.conftest import new_database
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
    with httpx.Client(timeout=10) as http:
        assert dispatcher.run_once(http) == 1
        assert dispatcher.run_once(http) == 0  # nothing due again: not retried
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

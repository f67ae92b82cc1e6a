"""The database goes away while a batch runs: results wait in the worker, messages stay unacked."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from db import JobStatus, upgrade
from tests.chaos.conftest import Chaos, wait_for
from tests.services import PostgresCluster


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, which it may stop and start."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


def test_results_wait_for_the_database_and_are_acked_only_after(
    chaos: Chaos, own_postgres: PostgresCluster
) -> None:
    url = own_postgres.create_database(f"cq_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    chaos.settings = chaos.settings.model_copy(update={"database_url": url})
    worker = chaos.start_worker()
    with chaos.client() as client:
        # Given a batch of long jobs running
        jobs = client.submit_many(
            [{"prompt": f"story {i}", "max_new_tokens": 300, "temperature": 0} for i in range(8)]
        )
        wait_for(lambda: len(client.list(status="running")) == 8, 60, "the batch to start")
        # When the database stops before the batch finishes
        own_postgres.halt()
        try:
            wait_for(lambda: "database unavailable" in worker.log_text(), 120, "a retry")
            # Then the worker holds the results and acks nothing
            assert chaos.unacked_messages() == 8
            wait_for(lambda: worker.log_text().count("database unavailable") >= 3, 60, "retries")
            assert chaos.unacked_messages() == 8
        finally:
            own_postgres.resume()
        # and once the database is back, the same attempt's results are committed, then acked
        done = client.wait(jobs, timeout=120)
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 8
        assert all(j.attempts == 1 and j.choices for j in done)
        wait_for(lambda: chaos.unacked_messages() == 0, 30, "the messages to be acked")
        assert worker.alive()

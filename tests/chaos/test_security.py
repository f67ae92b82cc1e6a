"""JSON only on the wire, and passwords never in a log line or an error."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu import Connection

from completion_queue.constants import TASK_GENERATE, queue_name
from completion_queue.redis_server import EmbeddedRedis
from db.models import JobStatus
from producer.cli import worker_env
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
        [sys.executable, "-m", "producer.cli", "submit", "Hello"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "could not queue" in failed.stderr and ":***@" in failed.stderr
    assert PASSWORD not in failed.stderr + failed.stdout

"""The light ops pieces: Flower's command line, durations, queue keys, the metrics module."""

from __future__ import annotations

import contextlib
import multiprocessing
import types
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.group import Duration
from completion_queue import (
    ConfigError,
    JobStatusCollector,
    Metrics,
    Settings,
    check_auth,
    create_app,
    flower_command,
    is_loopback,
    queue_keys,
)
from db import Choice, JobStatus, Outcome
from tests.factories import make_job
from workers.events import JobEvents
from workers.state import JobCounts


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("", False),
        ("10.0.0.5", False),
        ("flower.internal", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_flower_needs_auth_beyond_loopback_and_keeps_it_out_of_argv(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CQ_FLOWER_BASIC_AUTH"):
        check_auth(Settings(flower_address="0.0.0.0"))
    with pytest.raises(ConfigError, match="user:password"):
        check_auth(Settings(flower_basic_auth="admin"))
    settings = Settings(
        broker_url="redis://:pw@redis:6379/0",
        flower_address="0.0.0.0",
        flower_port=5566,
        flower_basic_auth="admin:s3cret,ops:other",
        flower_db=tmp_path / "state" / "flower.db",
    )
    argv, env = flower_command(settings)
    assert argv[1:6] == ["-m", "celery", "--app", "completion_queue.flower_app", "flower"]
    assert "--address=0.0.0.0" in argv and "--port=5566" in argv
    assert f"--db={tmp_path / 'state' / 'flower.db'}" in argv and "--persistent=True" in argv
    assert not any("s3cret" in arg for arg in argv)
    assert env["FLOWER_BASIC_AUTH"] == "admin:s3cret,ops:other"
    assert env["CQ_BROKER_URL"] == "redis://:pw@redis:6379/0"
    # Loopback needs no auth and keeps state in memory
    argv, env = flower_command(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert "--address=127.0.0.1" in argv and not any("--persistent" in a for a in argv)


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_durations(text: str, span: timedelta) -> None:
    assert Duration().convert(text, None, None) == span


@pytest.mark.parametrize("text", ["7", "7 days", "-1d", "d", "7y"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter, match="not a duration"):
        Duration().convert(text, None, None)


def test_queue_keys_follow_kombu_priority_lists() -> None:
    keys = queue_keys("cq.model.gpt2")
    assert keys[0] == "cq.model.gpt2" and keys[9] == "cq.model.gpt2\x06\x169" and len(keys) == 10


def test_events_are_on_for_flower() -> None:
    conf = create_app(Settings(), "redis://127.0.0.1:1/0").conf
    assert conf.worker_send_task_events and not conf.task_send_sent_event


def test_metrics_use_prometheus_names_in_their_own_registry() -> None:
    metrics, other = Metrics(), Metrics()  # two registries side by side
    metrics.observe_started(model="m", queue_wait_s=0.2)
    metrics.observe_finished(model="m", status="succeeded", latency_s=0.5)
    metrics.observe_finished(model="m", status="failed", latency_s=0.1)
    metrics.observe_batch(model="m", jobs=2, generation_s=0.25, tokens=10)
    metrics.registry.register(JobStatusCollector(lambda: {"queued": 3, "succeeded": 1}))
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.expose().decode())
        for s in family.samples
    }
    assert found[("cq_jobs_total", (("model", "m"), ("status", "succeeded")))] == 1
    assert found[("cq_jobs_total", (("model", "m"), ("status", "failed")))] == 1
    assert found[("cq_generation_seconds_bucket", (("le", "0.25"), ("model", "m")))] == 1
    assert found[("cq_job_latency_seconds_count", (("model", "m"),))] == 2
    assert found[("cq_request_queue_time_seconds_sum", (("model", "m"),))] == pytest.approx(0.2)
    assert found[("cq_batch_size_bucket", (("le", "2.0"), ("model", "m")))] == 1
    assert found[("cq_tokens_per_second", (("model", "m"),))] == 40
    assert found[("cq_completion_tokens_total", (("model", "m"),))] == 10
    assert found[("cq_jobs_in_status", (("status", "queued"),))] == 3
    assert b"cq_jobs_total{" not in other.expose()


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f for f in Settings.model_fields if f"`CQ_{f.upper()}`" not in readme]
    assert not missing, f"README.md's table lacks {missing}"


class FakeDispatcher:
    """Records events as the worker's dispatcher would send them."""

    enabled = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []
        self.flushes = 0
        self.batches = 0
        self.producer = self

    @contextlib.contextmanager
    def batch(self, max_size: int) -> Iterator[None]:
        """Stands for kombu's Producer.batch: one pipelined round trip."""
        self.batches += 1
        yield

    def send(self, kind: str, **fields: object) -> None:
        self.sent.append((kind, fields))

    def flush(self) -> None:
        self.flushes += 1


def test_job_events_per_job_state() -> None:

    events, dispatcher = JobEvents(), FakeDispatcher()
    events.claimed([], skipped=[uuid.uuid4()], worker="w")  # no dispatcher yet: nothing, no error
    events.dispatcher = dispatcher
    ran, gone = uuid.uuid4(), uuid.uuid4()
    job = make_job(id=ran)
    events.claimed([job], skipped=[gone], worker="w")
    events.finished(
        [job, job],
        [
            Outcome(
                job_id=ran,
                attempt=1,
                status=JobStatus.SUCCEEDED,
                choices=[Choice("hi", "length", 2)],
            ),
            Outcome(
                job_id=gone,
                attempt=1,
                status=JobStatus.FAILED,
                error={"type": "ModelError", "message": "boom"},
            ),
        ],
        generation_s=0.5,
    )
    kinds = [(kind, fields["uuid"]) for kind, fields in dispatcher.sent]
    assert kinds == [
        ("task-started", str(ran)),
        ("task-revoked", str(gone)),
        ("task-succeeded", str(ran)),
        ("task-failed", str(gone)),
    ]
    assert dispatcher.sent[2][1]["runtime"] == 0.5
    assert dispatcher.sent[3][1]["exception"] == "ModelError: boom"
    assert dispatcher.flushes == 2
    dispatcher.enabled = False  # `celery control disable_events`
    events.claimed([job], skipped=[], worker="w")
    assert len(dispatcher.sent) == 4


def test_a_pool_process_sends_through_its_own_dispatcher_and_counts_reach_the_parent() -> None:

    own = FakeDispatcher()
    options: dict[str, Any] = {}

    def dispatcher(conn: str, **given: Any) -> FakeDispatcher:
        options.update(given)
        return own

    app = types.SimpleNamespace(
        connection_for_write=lambda: "conn",
        events=types.SimpleNamespace(Dispatcher=dispatcher),
    )
    events, consumer = JobEvents(app), FakeDispatcher()  # type: ignore[arg-type]
    events.use(consumer)
    events.owner_pid = -1  # as seen from a forked pool process
    events.claimed([], skipped=[uuid.uuid4()], worker="cq1@host")
    assert consumer.sent == [] and [k for k, _ in own.sent] == ["task-revoked"]
    # buffered, so that each flush publishes the task events as one message
    assert options["buffer_group"] == {"task"} and options["hostname"] == "cq1@host"
    # Counts made before a fork add up in the parent
    counts = JobCounts()
    outcome = Outcome(job_id=uuid.uuid4(), attempt=1, status=JobStatus.SUCCEEDED)
    child = multiprocessing.get_context("fork").Process(
        target=counts.finished, args=([], [outcome, outcome]), kwargs={"generation_s": 0.1}
    )
    child.start()
    child.join(30)
    assert (counts.batches, counts.succeeded, counts.failed) == (1, 2, 0)
    # A job cancelled while it ran is counted neither succeeded nor failed
    stopped = Outcome(job_id=uuid.uuid4(), attempt=1, status=JobStatus.CANCELLED)
    failed = Outcome(job_id=uuid.uuid4(), attempt=1, status=JobStatus.FAILED)
    counts.finished([], [stopped, failed], generation_s=0.1)
    assert (counts.batches, counts.succeeded, counts.failed) == (2, 2, 1)

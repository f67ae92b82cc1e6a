"""The pure parts of waiting on PostgreSQL: reading a notification, counting a wait down."""

from __future__ import annotations

import json
import uuid

import pytest

from db import JobNotice, JobStatus, parse_notice
from producer.waits import Watch


def test_a_trigger_payload_reads_as_a_notice() -> None:
    job_id = uuid.uuid4()
    # PostgreSQL's json_build_object spaces its output so
    payload = f'{{"id" : "{job_id}", "status" : "succeeded", "completion_tokens" : 7}}'
    notice = parse_notice(payload)
    assert notice == JobNotice(job_id, JobStatus.SUCCEEDED, 7)
    assert notice is not None and notice.finished
    running = parse_notice(json.dumps({"id": str(job_id), "status": "running"}))
    assert running == JobNotice(job_id, JobStatus.RUNNING, None)
    assert running is not None and not running.finished


SOME_ID = "37951723-be05-4d8f-a7ed-8f7f48b984f9"  # fixed: it names tests (xdist collects twice)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "hello",
        "[1]",
        json.dumps({"id": "nope", "status": "queued"}),
        json.dumps({"id": SOME_ID}),
        json.dumps({"id": SOME_ID, "status": "sleeping"}),
    ],
)
def test_a_payload_sent_by_someone_else_is_no_notice(payload: str) -> None:
    assert parse_notice(payload) is None


def test_a_watch_counts_down_from_its_first_read_and_the_notices_since() -> None:
    # Given a wait for three jobs, woken on every notice
    a, b, c = (uuid.uuid4() for _ in range(3))
    wakes: list[None] = []
    watch = Watch([a, b, c], lambda: wakes.append(None))
    # When job a finishes before the wait's first read, which still sees it running,
    watch.finished(a)
    watch.start({a, b, c})
    # Then only b and c are left; and once b finishes (twice told), only c
    assert watch.left() == 2
    watch.finished(b)
    watch.finished(b)
    assert watch.left() == 1
    assert len(wakes) == 3
    # When the listener is lost, the wait learns it must poll
    watch.lose()
    assert watch.left() is None
    assert len(wakes) == 4

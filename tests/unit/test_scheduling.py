"""A request's lane and deadline: what is accepted, and errors that name the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from completion_queue import ValidationError
from producer import Limits, validate_request
from producer.scheduling import MAX_DEADLINE, parse_deadline, resolve_deadline, resolve_lane

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_a_deadline_is_seconds_from_now_or_a_time_with_a_zone() -> None:
    assert parse_deadline(90, now=NOW) == NOW + timedelta(seconds=90)
    assert parse_deadline(0.5, now=NOW) == NOW + timedelta(seconds=0.5)
    # the same instant in another zone, stored in UTC
    later = parse_deadline("2026-06-01T15:30:00+02:00", now=NOW)
    assert later == datetime(2026, 6, 1, 13, 30, tzinfo=UTC) and later.tzinfo is UTC
    assert parse_deadline("2026-06-01T13:00:00Z", now=NOW) == NOW + timedelta(hours=1)
    assert parse_deadline(NOW + MAX_DEADLINE, now=NOW) == NOW + MAX_DEADLINE


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (0, "above 0, got 0"),
        (-5, "above 0, got -5"),
        (float("inf"), "above 0"),
        (True, "a time or a number of seconds, got True"),
        ("soon", "ISO-8601 time with a zone"),
        ("2026-06-01T13:00:00", "must carry a timezone"),
        ("2026-06-01T11:00:00Z", "must be in the future"),
        (NOW, "must be in the future"),
        (MAX_DEADLINE.total_seconds() + 1, "at most 30 days from now"),
        (NOW + MAX_DEADLINE + timedelta(seconds=1), "at most 30 days from now"),
        ([60], "got list"),
    ],
)
def test_a_bad_deadline_is_refused_naming_the_field(value: object, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        resolve_deadline(value, now=NOW)
    assert refused.value.field == "deadline"
    assert str(refused.value).startswith("deadline must")
    assert says in str(refused.value)


def test_a_request_carries_its_lane_and_deadline() -> None:
    request = validate_request({"prompt": "x", "lane": "batch", "deadline": 60}, Limits())
    assert request.lane == "batch"
    assert request.deadline is not None
    left = (request.deadline - datetime.now(UTC)).total_seconds()
    assert 50 < left <= 60
    plain = validate_request({"prompt": "x"}, Limits())
    assert (plain.lane, plain.deadline) == (None, None)  # the submit call's own lane, no deadline


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("lane", "fast", "lane must be 'interactive' or 'batch', got 'fast'"),
        ("lane", 1, "lane must be 'interactive' or 'batch', got 1"),
        ("deadline", -1, "deadline must be a number of seconds above 0, got -1"),
        ("deadline", "2020-01-01T00:00:00Z", "deadline must be in the future"),
    ],
)
def test_a_request_with_a_bad_lane_or_deadline_names_it(
    field: str, value: object, says: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        validate_request({"prompt": "x", field: value}, Limits())
    assert refused.value.field == field
    assert says in str(refused.value)


def test_a_lane_is_interactive_or_batch() -> None:
    assert resolve_lane("interactive") == "interactive"
    assert resolve_lane("batch") == "batch"
    with pytest.raises(ValidationError) as refused:
        resolve_lane("bulk")
    assert refused.value.field == "lane"

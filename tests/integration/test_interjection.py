"""Interactive calls offered to a running group run between two of its decoding steps
(:class:`workers.interactive.Interjection`): the real static engine on the tiny model,
the runner and its progress writer, SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from db import Job, JobStatus, NewJob, Outcome, create_jobs, get_job, make_session_factory
from db import make_engine as make_db_engine
from engine.static import StaticEngine
from tests.conftest import new_database
from workers.interactive import Offers
from workers.listeners import BatchListener
from workers.progress import ProgressWriter
from workers.runner import BatchRunner

#: Batch lines long enough that the group has many steps left when the call comes.
LINE_TOKENS = 64


class OfferOnClaim(BatchListener):
    """Offers ``call`` to the flush as its batch group is claimed (so it comes at the group's
    first step, as a call comes in while a group runs); records the order of commits."""

    def __init__(self, offers: Offers | None, call: str) -> None:
        self.offers, self.call = offers, call
        self.offered: bool | None = None
        self.committed: list[list[str]] = []

    def claimed(self, jobs: Sequence[Job], *, skipped: Any, worker: str) -> None:
        if self.offers is not None and self.offered is None and jobs[0].lane == "batch":
            self.offered = self.offers.offer(self.call)

    def finished(self, jobs: Sequence[Job], outcomes: Sequence[Outcome], **_: Any) -> None:
        self.committed.append(sorted(job.prompt for job in jobs))


def run(
    engine: StaticEngine, url: str, *, offering: bool
) -> tuple[OfferOnClaim, dict[str, tuple[JobStatus, str, int]]]:
    """Store four batch lines and a call; run a flush of the lines (the call offered while
    they generate, if ``offering``; else the call in a flush of its own, after)."""
    sessions = make_session_factory(make_db_engine(url))
    lines = [
        NewJob(
            model="m",
            prompt=f"line {i} of the batch",
            params={"max_new_tokens": LINE_TOKENS, "temperature": 0},
            lane="batch",
        )
        for i in range(4)
    ]
    call = NewJob(
        model="m", prompt="Question: why is the sky", params={"max_new_tokens": 8, "temperature": 0}
    )
    with sessions.begin() as session:
        create_jobs(session, jobs=[*lines, call])
    offers = Offers() if offering else None
    listener = OfferOnClaim(offers, str(call.id))
    progress = ProgressWriter(
        sessions,
        decode=partial(engine.tokenizer.decode, skip_special_tokens=True),
        ends=[*engine.eos_ids, engine.pad_id],
        interval_ms=0,
        broker_url=None,
    )
    runner = BatchRunner(
        engine,
        sessions,
        max_rows=4,
        listeners=[listener, progress],
        progress=progress,
        offers=offers,
    )
    if offers is not None:
        offers.open()
    flush = runner.run_flush([str(j.id) for j in lines], worker="w")
    assert flush.handed_back == []
    if not offering:
        runner.run_flush([str(call.id)], worker="w")
    assert progress.drain()
    with sessions() as session:
        rows = {j.prompt: get_job(session, job_id=j.id) for j in [*lines, call]}
    return listener, {
        prompt: (row.status, row.text or "", row.attempts) for prompt, row in rows.items() if row
    }


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> StaticEngine:
    return StaticEngine(str(tiny_model), device="cpu", dtype="float32")


def test_a_call_offered_while_a_group_generates_runs_between_two_of_its_steps(
    engine: StaticEngine, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Given a group of four batch lines generating, and an interactive call offered then
    offered, rows = run(engine, new_database("sqlite", request, tmp_path), offering=True)
    assert offered.offered
    # Then the call was claimed, generated and committed while the group was paused: its
    # results before the group's
    assert offered.committed == [
        ["Question: why is the sky"],
        [f"line {i} of the batch" for i in range(4)],
    ]
    # and every job ran once, each text what it is without the call (the paused group's
    # rows and cache were left as they were)
    alone, reference = run(engine, new_database("sqlite", request, tmp_path), offering=False)
    assert alone.committed[-1] == ["Question: why is the sky"]
    assert rows == reference
    assert {status for status, _, _ in rows.values()} == {JobStatus.SUCCEEDED}
    assert {attempts for _, _, attempts in rows.values()} == {1}
    assert all(text for _, text, _ in rows.values())

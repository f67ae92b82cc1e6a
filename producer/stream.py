"""Reading jobs as they generate: text deltas from their Redis streams and their rows.

A job submitted with ``stream`` gets its text, step by step, in the Redis stream
``cq.events.<id>`` (``delta`` entries, then an ``end`` once its result is
committed); every running job shows its text so far in its row. A reader takes
both as the same kind of thing: a prefix of each choice's final text. For each
choice it keeps the text it has shown, and shows more only when a newer prefix
begins with it. So an attempt that starts over (a job redelivered after its
worker died) shows nothing until it passes what was shown, and the final row
completes the text. (An attempt that samples differently cannot be taken back:
the :class:`Finished` row is the truth.)

Deltas are never relied on: a job may fail before it runs, be cancelled while
queued, or never ask for ``stream``. A reader therefore reads the rows too: at
the start, about every second, and at an ``end`` entry; it stops when every
row is finished. Reading the stream from ``0-0``, a late reader first gets
everything written so far.

:class:`Follower` is the pure state; :func:`follow_async` (``redis.asyncio``, holding no
thread while it waits) drives it, and :func:`follow` runs that on an event loop of its own
for blocking code (see :mod:`producer.blocking`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio
from celery import Celery
from redis.typing import KeyT, StreamIdT
from sqlalchemy.orm import Session, sessionmaker

from completion_queue import BrokerUnavailable, JobNotFound, JobTimeout, events_key, redact_url
from db import Job, get_jobs
from producer.blocking import iterate_blocking

#: How long one XREAD waits for entries, and how often unfinished rows are read.
BLOCK_MS = 1000
ROW_INTERVAL_S = 1.0
#: Most entries one XREAD returns per stream.
READ_COUNT = 1000
#: The prefix of every stream entry id: a reader starts there to get everything written.
FIRST_ID = "0-0"
#: Half a character: a tokenizer decodes a partial UTF-8 sequence to U+FFFD.
REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class Delta:
    """New text of one choice of one job, to append to what came before."""

    job_id: uuid.UUID
    choice: int
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """A job reached its end state; ``job`` is its final row (the truth)."""

    job: Job


StreamEvent = Delta | Finished


class Source(Protocol):
    """What a reader needs of a :class:`producer.CompletionClient`."""

    @property
    def sessions(self) -> sessionmaker[Session]: ...
    @property
    def tenant(self) -> str | None: ...
    @property
    def app(self) -> Celery: ...


class JobStream:
    """What one reader has shown of one job, and where it stands in the job's stream."""

    def __init__(self, job_id: uuid.UUID) -> None:
        self.job_id = job_id
        self.key = events_key(job_id)
        #: The last entry id read: the next XREAD continues after it.
        self.last_id = FIRST_ID
        #: The text shown so far, by choice index.
        self.shown: dict[int, str] = {}
        #: The newest attempt seen in the stream, and its text per choice (its deltas joined).
        self.attempt = 0
        self._texts: dict[int, str] = {}
        #: An ``end`` entry came: the row holds the result.
        self.ended = False
        self.finished: Job | None = None

    def offer(self, choice: int, text: str, *, final: bool = False) -> Delta | None:
        """Return what ``text`` (a prefix of the choice's final text) adds to what was shown."""
        if not final:
            text = text.rstrip(REPLACEMENT)
        shown = self.shown.get(choice, "")
        if len(text) <= len(shown) or not text.startswith(shown):
            return None
        self.shown[choice] = text
        return Delta(self.job_id, choice, text[len(shown) :])

    def on_entry(self, entry_id: str, fields: Mapping[str, str]) -> Delta | None:
        """Take one stream entry; return the text it adds, if any."""
        self.last_id = entry_id
        try:
            attempt = int(fields.get("attempt", "0"))
        except ValueError:
            return None
        if fields.get("type") == "end":
            self.ended = True
            return None
        if fields.get("type") != "delta" or attempt < self.attempt:
            return None  # an older attempt, still writing, is not followed any more
        if attempt > self.attempt:
            self.attempt, self._texts = attempt, {}
        try:
            choice = int(fields["choice"])
        except (KeyError, ValueError):
            return None
        text = self._texts.get(choice, "") + fields.get("text", "")
        self._texts[choice] = text
        return self.offer(choice, text)

    def on_row(self, job: Job) -> list[StreamEvent]:
        """Take a snapshot of the job's row: its text so far, or its result."""
        final = job.status.finished
        events: list[StreamEvent] = []
        for choice, snapshot in enumerate(job.choices):
            delta = self.offer(choice, snapshot.text, final=final)
            if delta is not None:
                events.append(delta)
        if final:
            self.finished = job
            events.append(Finished(job))
        return events


class Follower:
    """The jobs one reader follows: their streams, when their rows are due, the idle timeout."""

    def __init__(
        self,
        job_ids: Sequence[uuid.UUID],
        *,
        idle_timeout_s: float | None = None,
        row_interval_s: float = ROW_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.streams = {job_id: JobStream(job_id) for job_id in job_ids}
        self._by_key = {stream.key: stream for stream in self.streams.values()}
        self.idle_timeout_s = idle_timeout_s
        self.row_interval_s = row_interval_s
        self.clock = clock
        self._rows_read_at: float | None = None
        self._progress_at = clock()

    @property
    def done(self) -> bool:
        """True once every job's final row was read."""
        return all(stream.finished is not None for stream in self.streams.values())

    def unfinished(self) -> list[JobStream]:
        """The streams of jobs whose final row was not read yet."""
        return [stream for stream in self.streams.values() if stream.finished is None]

    def cursors(self) -> dict[KeyT, StreamIdT]:
        """What to XREAD: each unfinished job's stream, after the last entry read."""
        return {stream.key: stream.last_id for stream in self.unfinished()}

    def rows_due(self) -> list[uuid.UUID]:
        """The jobs whose rows to read now: all unfinished ones at the start and every
        interval; otherwise those whose stream has ended."""
        now = self.clock()
        if self._rows_read_at is None or now - self._rows_read_at >= self.row_interval_s:
            self._rows_read_at = now
            return [stream.job_id for stream in self.unfinished()]
        return [stream.job_id for stream in self.unfinished() if stream.ended]

    def on_rows(
        self, jobs: Mapping[uuid.UUID, Job], asked: Iterable[uuid.UUID]
    ) -> list[StreamEvent]:
        """Take the rows read for ``asked``; :class:`JobNotFound` names one that is missing."""
        events: list[StreamEvent] = []
        for job_id in asked:
            job = jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job with id {job_id}")
            stream = self.streams[job_id]
            stream.ended = False
            events += stream.on_row(job)
        self._moved(events)
        return events

    def on_reply(self, reply: Any) -> list[StreamEvent]:
        """Take an XREAD reply (RESP2's list of pairs or RESP3's map; None when it timed out)."""
        events: list[StreamEvent] = []
        pairs = reply.items() if isinstance(reply, Mapping) else reply or []
        for key, entries in pairs:
            stream = self._by_key.get(_text(key))
            if stream is None:
                continue
            for entry_id, fields in entries:
                decoded = {_text(k): _text(v) for k, v in (fields or {}).items()}
                delta = stream.on_entry(_text(entry_id), decoded)
                if delta is not None:
                    events.append(delta)
        self._moved(events)
        return events

    def check_idle(self) -> None:
        """Raise :class:`JobTimeout` when no job showed new text for ``idle_timeout_s``."""
        if self.idle_timeout_s is None:
            return
        if self.clock() - self._progress_at > self.idle_timeout_s:
            waiting = len(self.unfinished())
            raise JobTimeout(f"{waiting} job(s) showed no new text within {self.idle_timeout_s:g}s")

    def _moved(self, events: list[StreamEvent]) -> None:
        if events:
            self._progress_at = self.clock()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_jobs(source: Source, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Job]:
    """The rows of ``job_ids`` that exist (the source's tenant's only), by id."""
    with source.sessions() as session:
        return get_jobs(session, job_ids=job_ids, tenant=source.tenant)


def _unavailable(source: Source, exc: BaseException) -> BrokerUnavailable:
    url = redact_url(source.app.conf.broker_url)
    return BrokerUnavailable(f"the broker cannot be reached at {url}: {redact_url(str(exc))}")


_REDIS_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    # A blocked XREAD answers within BLOCK_MS: past this the broker is gone.
    "socket_timeout": BLOCK_MS / 1000 + 5,
    "socket_connect_timeout": 2,
}
_BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError)


async def follow_async(
    source: Source, job_ids: Sequence[uuid.UUID], *, idle_timeout_s: float | None = None
) -> AsyncGenerator[StreamEvent, None]:
    """Yield the jobs' :class:`Delta` as they generate, and a :class:`Finished` for each.

    XREAD runs on ``redis.asyncio`` and rows are read in a thread: no thread is held while
    it waits.

    Raises:
        JobNotFound: a job does not exist (or is another tenant's).
        JobTimeout: no job showed new text for ``idle_timeout_s`` seconds.
        BrokerUnavailable: the broker cannot be reached.
    """
    follower = Follower(job_ids, idle_timeout_s=idle_timeout_s)
    broker = redis.asyncio.Redis.from_url(source.app.conf.broker_url, **_REDIS_OPTIONS)
    try:
        while True:
            due = follower.rows_due()
            if due:
                rows = await asyncio.to_thread(read_jobs, source, due)
                for event in follower.on_rows(rows, due):
                    yield event
            if follower.done:
                return
            follower.check_idle()
            try:
                reply = await broker.xread(follower.cursors(), count=READ_COUNT, block=BLOCK_MS)
            except _BROKER_ERRORS as exc:
                raise _unavailable(source, exc) from None
            for event in follower.on_reply(reply):
                yield event
    finally:
        # Closed even when the reader is cancelled (a client that went away).
        await asyncio.shield(broker.aclose())


def follow(
    source: Source, job_ids: Sequence[uuid.UUID], *, idle_timeout_s: float | None = None
) -> Iterator[StreamEvent]:
    """:func:`follow_async` for blocking code, on an event loop of its own; raises as it does."""
    return iterate_blocking(follow_async(source, job_ids, idle_timeout_s=idle_timeout_s))


def text_of(events: Iterable[StreamEvent], choice: int = 0) -> Iterator[str]:
    """The text deltas of one choice among ``events``."""
    for event in events:
        if isinstance(event, Delta) and event.choice == choice:
            yield event.text


__all__ = [
    "Delta",
    "Finished",
    "Follower",
    "JobStream",
    "Source",
    "StreamEvent",
    "follow",
    "follow_async",
    "read_jobs",
    "text_of",
]

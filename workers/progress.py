"""Progress while a group generates: partial output in the rows, deltas of streamed jobs, cancels.

A :class:`Watch` follows one group's generation. The engine hands it each
decoding step's tokens; every ``CQ_PROGRESS_INTERVAL_MS`` it hands a snapshot to
the :class:`ProgressWriter`, a thread of the model process that shows each job's
text so far in its row (one executemany, fenced like the final write) and tells
the watch which jobs this attempt no longer holds (cancelled, or claimed again
elsewhere). The engine stops those rows at its next step. With the interval at
0 the rows show nothing until the end, and the writer only checks for cancels.

Jobs submitted with ``stream`` get every step's new text in their Redis stream
(``cq.events.<id>``, see :func:`completion_queue.events_key`), written by the
same thread, then an ``end`` entry once the result is committed. The decoding
loop never waits on the database or on Redis.

Why a Redis stream per job and not pub/sub: a reader that connects late (a
client that reconnects, ``GET /v1/jobs/{id}/events`` after the submit) reads the
entries written so far, then blocks for the next ones; pub/sub drops whatever
was published before it subscribed. Each stream expires ``EVENTS_TTL_S`` after
its last write.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from completion_queue import EVENTS_MAXLEN, EVENTS_TTL_S, events_key
from db import Job, JobStatus, Outcome, Progress, lost_jobs, write_progress
from engine import GenerationRequest, cut_at_stop
from workers.listeners import BatchListener

log = logging.getLogger(__name__)

#: How often a watch checks for cancels when partial output is off (the interval is 0).
CANCEL_CHECK_S = 0.5


def shown_text(text: str, stops: Sequence[str]) -> str:
    """Return the part of a row's text so far that its final text will surely begin with.

    A stop string cuts the text there; the last characters that could still begin
    one are held back, and so is a trailing U+FFFD (half a character that the next
    token completes).
    """
    if stops:
        cut, found = cut_at_stop(text, stops)
        if found:
            return cut
        hold = max(len(s) for s in stops) - 1
        text = text[: len(text) - hold] if hold else text
    return text.rstrip("\ufffd")


class Row:
    """One choice of one job: the tokens generated so far and what was streamed of them."""

    __slots__ = ("cancelled_at", "choice", "done", "request", "tokens")

    def __init__(self, request: GenerationRequest, choice: int) -> None:
        self.request = request
        self.choice = choice
        self.tokens: list[int] = []
        self.done = False
        #: How many tokens the row kept when a cancel stopped it (None: not stopped).
        self.cancelled_at: int | None = None


class Watch:
    """Follows one group's generation: tokens per row, periodic refreshes, jobs to stop."""

    def __init__(
        self,
        jobs: Sequence[Job],
        *,
        writer: ProgressWriter,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.attempts = {str(job.id): job.attempts for job in jobs}
        self.streamed = {str(job.id) for job in jobs if job.params.get("stream")}
        self.interval_s = interval_s
        self.clock = clock
        #: Job keys this attempt no longer holds: their rows stop (filled by the writer).
        self.stopped: set[str] = set()
        #: Stopped jobs whose kept tokens are in their rows already.
        self.recorded: set[str] = set()
        #: Wall-clock time of each job's first generated token.
        self.first_token_at: dict[str, float] = {}
        #: Text already sent to each streamed (job, choice), kept across reruns.
        self.emitted: dict[tuple[str, int], str] = {}
        self.rows: dict[tuple[str, int], Row] = {}
        #: Called after every step the engine reports (the runner's
        #: :class:`workers.interactive.Interjection`: offered calls run between two steps).
        self.between: Callable[[], None] | None = None
        self._next_tick = clock() + (interval_s or CANCEL_CHECK_S)

    def follow(self, requests: Sequence[GenerationRequest]) -> RowView:
        """Start following ``requests``' rows, in the engine's order (each request's n rows)."""
        rows = [Row(r, c) for r in requests for c in range(r.n)]
        for row in rows:
            self.rows[row.request.key, row.choice] = row
        return RowView(self, rows)

    def kept(self, row: Row, length: int) -> list[int]:
        """The first ``length`` tokens of ``row`` that count: within budget, before any end."""
        tokens = row.tokens[: min(length, row.request.max_new_tokens)]
        if row.cancelled_at is not None:
            tokens = tokens[: row.cancelled_at]
        ends = self.writer.ends
        for i, token in enumerate(tokens):
            if token in ends:
                return tokens[:i]
        return tokens

    def tick(self, force: bool = False) -> None:
        """Hand the writer a snapshot, once per interval."""
        now = self.clock()
        if not force and now < self._next_tick:
            return
        self._next_tick = now + (self.interval_s or CANCEL_CHECK_S)
        snapshot = [(row, len(row.tokens)) for row in self.rows.values()]
        self.writer.submit(("progress", self, snapshot))


class RowView:
    """A watch's rows in one engine call's order (the engine's :class:`engine.FollowedRows`)."""

    def __init__(self, watch: Watch, rows: list[Row]) -> None:
        self.watch = watch
        self.rows = rows
        self._started = False

    def step(self, last: Sequence[int]) -> list[int]:
        """Take one step's new token of every row (static engine); return the rows to stop."""
        watch = self.watch
        if not self._started:
            self._started = True
            now = time.time()
            for row in self.rows:
                watch.first_token_at.setdefault(row.request.key, now)
        streamed = []
        for row, token in zip(self.rows, last, strict=True):
            if not row.done:
                row.tokens.append(token)
                budget = row.request.max_new_tokens
                row.done = token in watch.writer.ends or len(row.tokens) >= budget
                if row.request.key in watch.streamed:
                    streamed.append((row, len(row.tokens)))
        if streamed:
            watch.writer.submit(("deltas", watch, streamed))
        watch.tick()
        if watch.between is not None:
            watch.between()
        return self.to_stop()

    def set(self, index: int, tokens: list[int]) -> None:
        """Replace row ``index``'s tokens with ``tokens``, all it generated so far (continuous)."""
        watch, row = self.watch, self.rows[index]
        if tokens and row.request.key not in watch.first_token_at:
            watch.first_token_at[row.request.key] = time.time()
        row.tokens = tokens
        if row.request.key in watch.streamed:
            watch.writer.submit(("deltas", watch, [(row, len(tokens))]))
        watch.tick()

    def finish(self, index: int) -> None:
        """Mark row ``index`` ended (continuous)."""
        self.rows[index].done = True

    def tokens(self, index: int) -> list[int]:
        """Row ``index``'s tokens so far."""
        return list(self.rows[index].tokens)

    def tick(self) -> None:
        """Hand the writer a snapshot if the interval has passed (no step came meanwhile)."""
        self.watch.tick()

    def to_stop(self) -> list[int]:
        """Mark the rows of jobs this attempt no longer holds; return those newly stopped."""
        stopped = self.watch.stopped
        if not stopped:
            return []
        newly = []
        for index, row in enumerate(self.rows):
            if row.request.key in stopped and row.cancelled_at is None and not row.done:
                row.cancelled_at, row.done = len(row.tokens), True
                newly.append(index)
        return newly

    def cancelled_at(self, index: int) -> int | None:
        """How many tokens row ``index`` kept when a cancel stopped it, or None."""
        return self.rows[index].cancelled_at


class ProgressWriter(BatchListener):
    """The model process's thread that writes partial output, stream deltas and stream ends."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        decode: Callable[[list[int]], str],
        ends: Sequence[int],
        interval_ms: int,
        broker_url: str | None,
    ) -> None:
        self.sessions = sessions
        self.decode = decode
        self.ends = frozenset(ends)
        self.interval_s = interval_ms / 1000
        self.redis = redis.Redis.from_url(broker_url, socket_timeout=5) if broker_url else None
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def watch(self, jobs: Sequence[Job]) -> Watch:
        """Return a watch over the claimed ``jobs`` of one group."""
        return Watch(jobs, writer=self, interval_s=self.interval_s)

    def submit(self, item: tuple[Any, ...]) -> None:
        """Queue work for the thread (started on first use)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cq-progress", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._queue.put(item)

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written; False if it took past ``timeout_s``."""
        return self._idle.wait(timeout_s)

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """End the streams of streamed jobs, now that their results are committed."""
        attempts = {job.id: job.attempts for job in jobs if job.params.get("stream")}
        ends = [(o.job_id, attempts[o.job_id], o.status) for o in outcomes if o.job_id in attempts]
        if ends and self.redis is not None:
            self.submit(("ends", ends))

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                self._write(items)
            except Exception:
                # Progress is never a reason to fail a batch: the final write is the truth.
                log.warning("writing progress failed", exc_info=True)
            if self._queue.empty():
                self._idle.set()

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        deltas: dict[tuple[int, str, int], tuple[Watch, Row, int]] = {}
        entries: list[tuple[str, dict[str, str]]] = []
        for item in items:
            if item[0] == "deltas":
                _, watch, rows = item
                for row, length in rows:
                    deltas[id(watch), row.request.key, row.choice] = (watch, row, length)
            elif item[0] == "progress":
                self._progress(item[1], item[2])
            elif item[0] == "ends":
                for job_id, attempt, status in item[1]:
                    end = {"type": "end", "attempt": str(attempt), "status": status.value}
                    entries.append((events_key(job_id), end))
        for watch, row, length in deltas.values():
            entry = self._delta(watch, row, length)
            if entry is not None:
                entries.append(entry)
        if entries and self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            for key, fields in entries:
                pipe.xadd(key, fields, maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
                pipe.expire(key, EVENTS_TTL_S)
            pipe.execute()

    def _delta(self, watch: Watch, row: Row, length: int) -> tuple[str, dict[str, str]] | None:
        tokens = watch.kept(row, length)
        text = shown_text(self.decode(tokens), row.request.stop)
        key = (row.request.key, row.choice)
        sent = watch.emitted.get(key, "")
        # A rerun of the group starts over: send nothing until it passes what was sent.
        if len(text) <= len(sent) or not text.startswith(sent):
            return None
        watch.emitted[key] = text
        fields = {
            "type": "delta",
            "attempt": str(watch.attempts[row.request.key]),
            "choice": str(row.choice),
            "text": text[len(sent) :],
            "tokens": str(len(tokens)),
        }
        return events_key(row.request.key), fields

    def _progress(self, watch: Watch, snapshot: list[tuple[Row, int]]) -> None:
        by_job: dict[str, list[tuple[Row, int]]] = {}
        for row, length in sorted(snapshot, key=lambda pair: pair[0].choice):
            by_job.setdefault(row.request.key, []).append((row, length))
        # Cancelled jobs whose rows all stopped: their tokens are recorded now, not when the
        # group ends (the final write records the same, cut exactly).
        stopped = [
            key
            for key in watch.stopped - watch.recorded
            if key in by_job and all(row.done for row, _ in by_job[key])
        ]
        held = [
            (uuid.UUID(key), attempt)
            for key, attempt in watch.attempts.items()
            if key not in watch.stopped
        ]
        with self.sessions.begin() as session:
            if stopped:
                kept = [self._partial(watch, key, by_job[key], "cancelled") for key in stopped]
                write_progress(session, progress=kept, status=JobStatus.CANCELLED)
                watch.recorded.update(stopped)
            if not held:
                return
            if watch.interval_s > 0:
                progress = [
                    self._partial(watch, key, rows, None)
                    for key, rows in by_job.items()
                    if key not in watch.stopped
                ]
                if write_progress(session, progress=progress) == len(held):
                    return
            lost = lost_jobs(session, held=held)
        if lost:
            log.info("%d job(s) cancelled or taken over while running; stopping them", len(lost))
            watch.stopped.update(str(job_id) for job_id in lost)

    def _partial(
        self, watch: Watch, key: str, rows: list[tuple[Row, int]], finish: str | None
    ) -> Progress:
        """One job's choices so far; ``finish`` for the rows a cancel stopped."""
        choices = []
        for row, length in rows:
            tokens = watch.kept(row, length)
            choices.append(
                {
                    "text": shown_text(self.decode(tokens), row.request.stop),
                    "finish_reason": finish if row.cancelled_at is not None else None,
                    "completion_tokens": len(tokens),
                }
            )
        return Progress(uuid.UUID(key), watch.attempts[key], choices)

"""Waiting for jobs to finish: one shared LISTEN connection on PostgreSQL, a polling backoff
elsewhere.

On PostgreSQL a trigger notifies channel ``cq_jobs`` whenever a job's status changes
(see :mod:`db.notify`). A client and its tenant views share one :class:`Listener`: one
dedicated connection in autocommit that runs ``LISTEN cq_jobs``, and one daemon thread
that reads its notifications and wakes the waits registered for their job ids, so a
hundred waits hold one connection and no thread each. A wait costs two reads however
long it lasts: it registers its ids, reads which are still unfinished (a job may have
finished before it listened), counts them down from the notifications' payloads, and
reads the jobs once at the end.

If the listener cannot connect, or its connection fails, it says so in the log and the
waits poll instead (those in progress from then on); a later wait tries to listen again.
SQLite polls with a backoff, as does everything after :meth:`Waits.close`.

A wait is one coroutine: :meth:`Waits.wait_async` runs it on the caller's event loop (the
HTTP API's), reading the database in threads; :meth:`Waits.wait` runs it on a private loop
per call (see :mod:`producer.blocking`), reading the database on that loop, where nothing
else runs. The listener's thread is the same for both: it wakes each wait through that
wait's own loop, and a wake that comes after a private loop closed is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from completion_queue import JobNotFound, JobTimeout
from db import NOTIFY_CHANNEL, Job, count_unfinished, get_jobs, parse_notice, unfinished_ids
from producer.blocking import Offload, inline, run_blocking

log = logging.getLogger(__name__)

#: Polling backoff: first interval, growth factor, longest interval.
POLL_FIRST_S, POLL_FACTOR, POLL_MAX_S = 0.02, 1.5, 0.5
#: Job ids per query when many are read at once.
CHUNK = 500
#: How often the listener thread looks up from its connection to see whether it must stop.
LISTEN_TICK_S = 0.5
#: After the listener could not connect, new waits poll this long before it tries again.
RELISTEN_AFTER_S = 30.0
#: Defaults for the listener's connection: a server that vanished without a word is noticed.
LISTEN_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
#: Guards the creation of a client's :class:`Waits` (one per client and its tenant views).
WAITS_LOCK = threading.Lock()

Progress = Callable[[int, int], None]


def listen_connection(engine: Engine) -> psycopg.Connection[Any]:
    """A new psycopg connection in autocommit to ``engine``'s PostgreSQL database."""
    if engine.dialect.driver == "psycopg":
        # The very arguments SQLAlchemy's psycopg dialect connects with (host, port, dbname,
        # user, password and the URL's query), less its type adapters.
        args, params = engine.dialect.create_connect_args(engine.url)
        params.pop("context", None)
    else:
        args, params = [engine.url.set(drivername="postgresql").render_as_string(False)], {}
    return psycopg.connect(*args, **{**LISTEN_CONNECT_DEFAULTS, **params, "autocommit": True})


class Watch:
    """One wait's registration with a :class:`Listener`: which of its jobs are unfinished."""

    def __init__(self, ids: Collection[uuid.UUID], wake: Callable[[], None]) -> None:
        self.ids = frozenset(ids)
        self._wake = wake
        self._lock = threading.Lock()
        self._seen_finished: set[uuid.UUID] = set()  # before the first read
        self._pending: set[uuid.UUID] | None = None  # unfinished: read once, then counted down
        self._lost = False

    def start(self, unfinished: Collection[uuid.UUID]) -> None:
        """Start counting down from the first read (jobs notified since then are finished)."""
        with self._lock:
            self._pending = set(unfinished) - self._seen_finished
            self._seen_finished.clear()

    def left(self) -> int | None:
        """How many jobs are still unfinished; None once the listener is lost (poll instead)."""
        with self._lock:
            if self._lost:
                return None
            return len(self.ids) if self._pending is None else len(self._pending)

    def finished(self, job_id: uuid.UUID) -> None:
        """Count ``job_id`` finished (called by the listener's thread) and wake the wait."""
        with self._lock:
            if self._pending is None:
                self._seen_finished.add(job_id)
            else:
                self._pending.discard(job_id)
        self._wake()

    def lose(self) -> None:
        """The listener is gone: wake the wait, which polls from now on."""
        with self._lock:
            self._lost = True
        self._wake()


class Listener:
    """One ``LISTEN cq_jobs`` connection and its reading thread, shared by a client's waits.

    Args:
        connect: opens the dedicated connection (autocommit), in the listener's thread.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._watches: dict[uuid.UUID, set[Watch]] = {}
        self._attempt: threading.Event | None = None  # set once listening, or once that failed
        self._listening = False
        self._failed_at: float | None = None
        self._closed = False

    def watch(
        self, ids: Collection[uuid.UUID], wake: Callable[[], None], deadline: float
    ) -> Watch | None:
        """Register a wait for ``ids``; None when not listening by ``deadline`` (then poll)."""
        with self._lock:
            if self._closed:
                return None
            attempt = self._attempt
            if attempt is None:
                failed_at = self._failed_at
                if failed_at is not None and time.monotonic() - failed_at < RELISTEN_AFTER_S:
                    return None
                attempt = self._attempt = threading.Event()
                thread = threading.Thread(target=self._run, args=(attempt,), daemon=True)
                thread.name = "cq-listen"
                thread.start()
        attempt.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if not self._listening or self._attempt is not attempt:
                return None
            watch = Watch(ids, wake)
            for job_id in watch.ids:
                self._watches.setdefault(job_id, set()).add(watch)
            return watch

    def forget(self, watch: Watch) -> None:
        """Unregister ``watch`` (its wait is over)."""
        with self._lock:
            for job_id in watch.ids:
                watches = self._watches.get(job_id)
                if watches is not None:
                    watches.discard(watch)
                    if not watches:
                        del self._watches[job_id]

    def close(self) -> None:
        """Stop listening: the thread closes its connection within ``LISTEN_TICK_S``."""
        with self._lock:
            self._closed = True

    def _run(self, attempt: threading.Event) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._connect()
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except Exception as exc:
            if conn is not None:
                conn.close()
            log.warning(
                "could not LISTEN on %s (%s): waits poll, for %gs at least",
                NOTIFY_CHANNEL,
                exc,
                RELISTEN_AFTER_S,
            )
            with self._lock:
                self._attempt, self._failed_at = None, time.monotonic()
            attempt.set()
            return
        with self._lock:
            self._listening = True
        attempt.set()
        try:
            while not self._closed:
                for notify in conn.notifies(timeout=LISTEN_TICK_S):
                    self._dispatch(notify.payload)
        except Exception as exc:
            if not self._closed:  # a server that stops after close() is no news
                log.warning(
                    "lost the LISTEN connection on %s (%s): waits poll until one listens again",
                    NOTIFY_CHANNEL,
                    exc,
                )
        finally:
            with self._lock:
                self._listening, self._attempt = False, None
                lost = {watch for watches in self._watches.values() for watch in watches}
                self._watches.clear()
            for watch in lost:
                watch.lose()
            with contextlib.suppress(Exception):
                conn.close()

    def _dispatch(self, payload: str) -> None:
        notice = parse_notice(payload)
        if notice is None or not notice.finished:
            return
        with self._lock:
            watches = list(self._watches.get(notice.id, ()))
        for watch in watches:
            watch.finished(notice.id)


def _timeout(unfinished: int, total: int, timeout: float) -> JobTimeout:
    return JobTimeout(f"{unfinished} of {total} job(s) still queued or running after {timeout}s")


def _next_poll(
    interval: float, deadline: float, unfinished: int, total: int, timeout: float
) -> float:
    """How long to sleep before the next poll; :class:`JobTimeout` past the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(unfinished, total, timeout)
    return min(interval, remaining)


class Waits:
    """How a client waits for its jobs: it listens on PostgreSQL, and polls elsewhere."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self.listener = (
            Listener(lambda: listen_connection(engine))
            if engine.dialect.name == "postgresql"
            else None
        )

    def wait(
        self,
        ids: Sequence[uuid.UUID],
        *,
        tenant: str | None,
        timeout: float,
        on_progress: Progress | None = None,
    ) -> list[Job]:
        """Block until the jobs ``ids`` are finished; return them in that order.

        It runs :meth:`wait_async` on an event loop of its own, reading the database on it.

        Raises:
            JobTimeout: some job is still queued or running after ``timeout`` seconds.
            JobNotFound: an id does not exist (of ``tenant``'s, when given).
        """
        return run_blocking(self._wait(ids, tenant, timeout, on_progress, inline))

    async def wait_async(
        self,
        ids: Sequence[uuid.UUID],
        *,
        tenant: str | None,
        timeout: float,
        on_progress: Progress | None = None,
    ) -> list[Job]:
        """:meth:`wait` for asyncio code: it reads the database in threads, and holds none while
        it waits."""
        return await self._wait(ids, tenant, timeout, on_progress, asyncio.to_thread)

    async def _wait(
        self,
        ids: Sequence[uuid.UUID],
        tenant: str | None,
        timeout: float,
        on_progress: Progress | None,
        offload: Offload,
    ) -> list[Job]:
        """The one wait: count down from notifications while listening, else poll."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:  # called by the listener's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: the wait is over
                loop.call_soon_threadsafe(woken.set)

        watch = None
        if self.listener is not None and ids:
            watch = await offload(self.listener.watch, ids, wake, deadline)
        if watch is not None:
            try:
                watch.start(await offload(self.unfinished_ids, ids, tenant=tenant))
                told = None
                while (left := watch.left()) is not None:
                    if on_progress is not None and left != told:
                        on_progress(len(ids) - left, len(ids))
                        told = left
                    if left == 0:
                        return await offload(self.collect, ids, tenant=tenant)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _timeout(left, len(ids), timeout)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await woken.wait()
                    # Cleared before the count is read again: a wake after it is not missed.
                    woken.clear()
            finally:
                self._forget(watch)
        # Not listening, or the listener was lost: poll.
        interval = POLL_FIRST_S
        while True:
            unfinished = await offload(self.unfinished, ids, tenant=tenant)
            if on_progress is not None:
                on_progress(len(ids) - unfinished, len(ids))
            if unfinished == 0:
                return await offload(self.collect, ids, tenant=tenant)
            await asyncio.sleep(_next_poll(interval, deadline, unfinished, len(ids), timeout))
            interval = min(interval * POLL_FACTOR, POLL_MAX_S)

    def _forget(self, watch: Watch) -> None:
        if self.listener is not None:
            self.listener.forget(watch)

    def unfinished(self, ids: Sequence[uuid.UUID], *, tenant: str | None) -> int:
        """How many of ``ids`` are still queued or running (in chunks of ``CHUNK``)."""
        with self._sessions() as session:
            return sum(
                count_unfinished(session, job_ids=ids[i : i + CHUNK], tenant=tenant)
                for i in range(0, len(ids), CHUNK)
            )

    def unfinished_ids(self, ids: Sequence[uuid.UUID], *, tenant: str | None) -> set[uuid.UUID]:
        """Which of ``ids`` are still queued or running (in chunks of ``CHUNK``)."""
        found: set[uuid.UUID] = set()
        with self._sessions() as session:
            for i in range(0, len(ids), CHUNK):
                found |= unfinished_ids(session, job_ids=ids[i : i + CHUNK], tenant=tenant)
        return found

    def collect(self, ids: Sequence[uuid.UUID], *, tenant: str | None) -> list[Job]:
        """The jobs ``ids``, in that order; :class:`JobNotFound` names any missing."""
        jobs: dict[uuid.UUID, Job] = {}
        with self._sessions() as session:
            for i in range(0, len(ids), CHUNK):
                jobs.update(get_jobs(session, job_ids=ids[i : i + CHUNK], tenant=tenant))
        missing = [str(i) for i in ids if i not in jobs]
        if missing:
            raise JobNotFound(f"no job with id {', '.join(missing[:5])}")
        return [jobs[i] for i in ids]

    def close(self) -> None:
        """Stop listening; waits from now on poll."""
        if self.listener is not None:
            self.listener.close()

"""The batch task class: celery-batches, with a flush policy that keeps the model busy.

``celery_batches.Batches`` buffers messages and flushes them to the pool every
``flush_every`` messages or every ``flush_interval`` seconds. Two changes make
it fit a worker whose one pool process holds the model:

- While a batch is running, nothing more is flushed: a small batch queued behind
  the running one costs, on an accelerator, about as much as a full one, and a
  full one queued in the pool could not be handed back at once by a worker that
  leaves (:mod:`workers.leave`). The buffer keeps filling, and when the running
  batch returns, whatever is buffered is flushed straight away (a pipe write: the
  model waits milliseconds, against seconds for a flush).
- A flush of more messages than one group (the static engine's batch size)
  sends whole groups' worth and keeps the rest buffered, first in line for the
  next flush. A burst that the flush timer cut in two (56 of 64 jobs buffered
  20 ms after the first) then runs as two full groups, not 32, 24 and 8: the
  kept messages and the late ones flush together when the running batch
  returns. A kept message so waits at most one batch; it would have waited for
  that batch anyway, in the same flush.
- An idle worker's timer does not flush less than a group while messages are
  still coming in (one came in the last half interval): a burst that takes
  longer than ``CQ_BATCH_WAIT_MS`` to arrive lands in one flush, not in a small
  group first. It waits at most :data:`ARRIVAL_WAIT_INTERVALS` intervals from
  the first message; a lone job flushes at the first tick, as before.
- A worker holding more than its share (:mod:`workers.dispatch`) hands back the
  unstarted groups of its running flush (they come back with its return) and then
  the newest buffered messages, up to the excess.
- An interactive message that comes in while a flush runs is not buffered: its job
  is offered to the running flush (:mod:`workers.interactive`), which runs it between
  two decoding steps, and its message is settled with that flush's. Interactive
  messages are never among those a flush keeps back.
- If the pool process dies mid-batch (SIGKILL, OOM killer), the batch's messages
  are requeued at once, instead of waiting for Redis' visibility timeout.
- The messages are acknowledged only when the task returns True (its results
  are committed). celery-batches logs an exception and returns None; then the
  messages are requeued too (e.g. the database stayed away past CQ_DB_RETRY_S).
  The acks wait one turn of the event loop, so the next flush reaches the pool
  process first: each ack is a Redis round trip, and 256 of them kept the model
  idle for ~45 ms per flush. The pool process gets only each message's id and
  the worker's name (:func:`lean`), not the whole request.
- After the broker connection is lost, Celery clears its timer (the flush timer
  with it) and kombu gives back every message the old connection held:
  :meth:`ModelBatches.forget_buffer` drops the buffered requests, which can no
  longer be acknowledged, and lets the next message arm a new flush timer.

On the vLLM engine (``joins``), jobs join the running ones at the engine's next
step, so none of the holding back above applies: a flush goes to the model
process at once, and its task returns as soon as its jobs are handed to a thread
there. The model process gets no more jobs than its engine has rows for
(``engine_rows``, of which batch lines take ``batch_rows`` at most): the worker
holds a flush more (:func:`completion_queue.prefetch_count`), buffered here, and
each tick of the flush timer sends what the rows freed since take. So a row
that ends is filled within a tick, not after its job's ack, the dispatcher's
release and Celery's delivery of another, and what is buffered was never
claimed: a leaving worker hands it back at once. An interactive call that comes
while batch lines run goes 2 ms after it came rather than at the timer's tick, in
a flush of its own (a flush is read, claimed and tokenized whole before any of
its rows runs), and takes a row of the interactive margin, which batch lines
leave free in the engine. The messages stay held, by job id, until the model process
reports each job committed on the :class:`workers.acks.AckChannel` (then acknowledged)
or given up (then requeued); if it dies, everything held is requeued at once. A second
message for a job already held here is not run again: it waits with the first and is
acknowledged with it (a second run would be fenced out by the first).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from functools import partial
from queue import Queue
from typing import Any

from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from kombu.asynchronous import get_event_loop
from kombu.transport.virtual import QoS as VirtualQoS

from workers.interactive import Offers, is_interactive
from workers.listeners import BatchListener

log = logging.getLogger(__name__)

#: How long, in flush intervals from its first message, a partial buffer may wait for a
#: burst still arriving.
ARRIVAL_WAIT_INTERVALS = 4
#: Joining engines (vLLM): a message that finds the worker idle (no job in its model
#: process), or an interactive call that finds batch lines there, is flushed this soon
#: after it came, with whatever came meanwhile, not at the buffer timer's next tick (up to
#: ``CQ_BATCH_WAIT_MS`` later).
JOIN_GATHER_S = 0.002


class Arrivals(Queue[Request]):
    """The buffer, with when its first message came (since it was empty) and its last."""

    def __init__(self) -> None:
        super().__init__()
        self.first = self.last = 0.0
        #: Asked first of each message that comes in: True when it went elsewhere.
        self.divert: Callable[[Request], bool] | None = None
        #: Called with each message that came in, and whether it found the buffer empty.
        self.on_arrival: Callable[[Request, bool], None] | None = None

    def put(self, item: Request, block: bool = True, timeout: float | None = None) -> None:
        """Buffer a message that just came in (unless :attr:`divert` takes it)."""
        if self.divert is not None and self.divert(item):
            return
        now = time.monotonic()
        first = self.empty()
        if first:
            self.first = now
        self.last = now
        super().put(item, block, timeout)
        if self.on_arrival is not None:
            self.on_arrival(item, first)

    def put_back(self, item: Request) -> None:
        """Buffer again a message that came earlier (not an arrival)."""
        if self.empty():
            self.first = time.monotonic()
        super().put(item)


def lean(request: Request) -> SimpleRequest:
    """What the pool process needs of a message: its task id (the job id), the worker's name.

    Not the whole request (headers and all): ten times the bytes to pickle and pipe.
    """
    return SimpleRequest(
        request.id, request.name, (), {}, {}, request.hostname, True, None, None, None
    )


def settle(
    requests: Sequence[Request],
    *,
    committed: bool,
    handed_back: Collection[str] = (),
    now: bool = False,
) -> None:
    """Acknowledge a flush's messages once its results are committed; else requeue them.

    Those of ``handed_back`` jobs (not started: the worker is leaving, or holds more than
    its share) are requeued too. ``now``: acknowledge on the broker at once, not on the
    event loop's next turn (Celery's way), which a stopping worker no longer runs: its
    acks would be lost, and every message it held restored when its connection closes.

    The requeued ones go back together, in one transaction (:func:`requeue_at_once`),
    never one by one: a dispatcher step (:mod:`workers.dispatch`, another thread) that
    ran between two of them would release the first back to the model's queue alone,
    and a crashed batch's jobs would come back split across flushes.
    """
    back = []
    for request in requests:
        ack = committed and request.id not in handed_back
        if request.acknowledged:
            continue
        if not ack:
            back.append(request)
        elif not now:
            request.acknowledge()
        else:
            request.acknowledged = True
            try:
                request.message.ack()
            except Exception as exc:  # the connection is gone: its messages go back anyway
                log.warning("could not acknowledge message %s: %r", request.id, exc)
    if back:
        requeue_at_once(back)


def requeue_at_once(requests: Sequence[Request]) -> None:
    """Put the messages of ``requests`` back at the head of their queues, in their order,
    in one Redis transaction (kombu's reject takes four round trips per message: 300 of
    them took a second). The unacked entries go in the same transaction."""
    channel = requests[0].message.channel
    qos = channel.qos
    tags = [request.message.delivery_tag for request in requests]
    queues: dict[tuple[str, str], list[str]] = {}

    def transaction(pipe: Any) -> None:
        payloads = pipe.hmget(qos.unacked_key, tags)
        pipe.multi()
        # kombu pops from the right: the first message ends rightmost, next to go.
        for tag, raw in zip(reversed(tags), reversed(payloads), strict=True):
            pipe.zrem(qos.unacked_index_key, tag)
            pipe.hdel(qos.unacked_key, tag)
            if raw is None:
                continue  # restored meanwhile by a visibility sweep
            payload, exchange, routing_key = json.loads(raw)
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
            key = (exchange, routing_key)
            if key not in queues:
                queues[key] = list(channel._lookup(exchange, routing_key))
            priority = channel._get_message_priority(payload, reverse=False)
            for queue in queues[key]:
                pipe.rpush(channel._q_for_pri(queue, priority), json.dumps(payload))

    try:
        with channel.conn_or_acquire() as client:
            client.transaction(transaction, qos.unacked_key)
    except Exception as exc:  # the connection is gone: kombu restores them when it closes
        log.warning("could not requeue %d message(s): %r", len(requests), exc)
        return
    for request, tag in zip(requests, tags, strict=True):
        request.acknowledged = True
        # Forget it here, as kombu's reject does after its restore.
        VirtualQoS.ack(qos, tag)  # type: ignore[no-untyped-call]


def flush_outcome(result: Any) -> tuple[bool, frozenset[str]]:
    """Read what a flush's task returned: committed, and the job ids it handed back.

    ``True``: all committed; a list of job ids: those were not started, the rest
    committed; anything else (None: it raised): nothing committed.
    """
    if isinstance(result, list):
        return True, frozenset(result)
    return result is True, frozenset()


class ModelBatches(Batches):  # type: ignore[misc]
    """A ``Batches`` task that flushes partial buffers only while the model is idle."""

    abstract = True

    #: Told of each flush's requests before they go to the pool (task events).
    listeners: Sequence[BatchListener] = ()
    #: Messages in a full group (0: a flush sends every buffered message).
    group_size: int = 0
    #: Jobs join the running ones (vLLM): flush at once, ack on the model process's reports.
    joins: bool = False
    #: Joining only: the rows the engine runs at once (0: no limit), and of them the most
    #: that batch lines take.
    engine_rows: int = 0
    batch_rows: int = 0
    #: Interactive jobs handed to the running flush (static engine, :mod:`workers.interactive`).
    offers: Offers | None = None

    def __init__(self) -> None:
        super().__init__()
        self._buffer: Arrivals = Arrivals()
        self._buffer.divert = self._offer
        self._buffer.on_arrival = self._arrival
        self._running = 0
        #: Joining only: the messages sent to the model process and not yet settled, by job id.
        self._held: dict[str, list[Request]] = {}
        #: Joining only: the held jobs whose flush task returned (they run in the model process).
        self._taken: set[str] = set()
        #: Joining only: the held jobs that are batch lines (not interactive calls).
        self._held_batch: set[str] = set()
        #: Joining only: a flush sooner than the timer's is due (see :meth:`_arrival`).
        self._early = False
        #: The messages of each flush sent to the model process and not yet returned.
        self._flushing: list[list[Request]] = []
        #: The worker is leaving: its event loop no longer runs (see :meth:`leave`).
        self._leaving = False
        #: Messages held above the worker's share, to hand back when the running flush
        #: returns (see :meth:`hand_back`).
        self._excess = 0

    def forget_buffer(self) -> None:
        """Drop buffered requests of a lost connection, and the flush timer Celery cleared."""
        dropped = 0
        for queue in (self._buffer, self._pending):
            while not queue.empty():
                queue.get_nowait()
                dropped += 1
        self._tref = None
        self._count = itertools.count(1)
        # Held messages of the old connection can no longer be acknowledged either.
        dropped += sum(len(held) for held in self._held.values())
        self._held.clear()
        self._taken.clear()
        self._held_batch.clear()
        self._early = False  # its timer went with the connection's
        if dropped or self._running:
            log.warning(
                "broker connection was lost: dropped %d buffered message(s), "
                "stopped waiting for %d flush(es)",
                dropped,
                self._running,
            )
        # A flush of the old connection may never report back: stop waiting for it.
        self._running = 0

    def leave(self) -> int:
        """The worker is leaving (its event loop no longer runs): from now on settle every
        message on the broker at once, flush nothing more, and requeue every buffered
        message (none was sent to the model process). Return how many went back."""
        self._leaving = True
        requests: list[Request] = []
        for queue in (self._buffer, self._pending):
            while not queue.empty():
                requests.append(queue.get_nowait())
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        settle(requests, committed=False, now=True)
        return len(requests)

    def hand_back_unstarted(self, queued: Callable[[list[str]], Collection[str]]) -> int:
        """Requeue at once the messages of running flushes whose jobs ``queued`` says are
        still queued: the worker is leaving and its claim gate is closed, so they will not
        start here (the flush hands them back too when it returns; a message is settled
        once). Return how many went back."""
        requests = [request for flush in self._flushing for request in flush]
        if not requests:
            return 0
        back = set(queued([request.id for request in requests]))
        unstarted = [request for request in requests if request.id in back]
        settle(unstarted, committed=False, now=True)
        return len(unstarted)

    def hand_back(self, excess: int) -> None:
        """The worker holds ``excess`` messages above its share (told from the dispatcher's
        thread, which also asks the running flush to stop at its next group): when that
        flush returns, the newest buffered messages go back too, up to the ``excess`` less
        what it handed back."""
        self._excess = excess

    def _shed(self, count: int) -> None:
        """Requeue at once the newest ``count`` buffered messages (on the event loop)."""
        requests: list[Request] = []
        while not self._buffer.empty():
            requests.append(self._buffer.get_nowait())
        keep = max(0, len(requests) - count)
        for request in requests[:keep]:
            self._buffer.put_back(request)
        if back := requests[keep:]:
            log.info("handing back %d buffered message(s) above this worker's share", len(back))
            settle(back, committed=False, now=True)

    def _offer(self, request: Request) -> bool:
        """Hand an interactive message's job to the running flush; True if it took it (the
        message is then settled with that flush's)."""
        if not (self._running and self._flushing and self.offers is not None):
            return False
        if not is_interactive(request):
            return False
        if all(is_interactive(r) for r in self._flushing[-1]):
            # A flush of interactive calls alone is no batch to wait behind: the call waits
            # in the buffer, and goes in whole groups with what was kept back and came since.
            return False
        if not self.offers.offer(request.id):
            return False
        self._flushing[-1].append(request)
        self._tell_received([request])
        return True

    def _tell_received(self, requests: list[Request]) -> None:
        for listener in self.listeners:
            try:
                listener.received(requests)
            except Exception:
                log.exception("batch listener %r failed; the batch runs anyway", listener)

    def _forget_flush(self, requests: list[Request]) -> None:
        self._flushing = [flush for flush in self._flushing if flush is not requests]

    def _do_flush(self) -> None:
        if self.joins:
            if not self._waits():
                super()._do_flush()  # the engine takes new jobs at its next step
            return
        if self._running:
            return  # the model is busy: the next batch fills up, and flushes when it returns
        if self._arriving():
            return  # a burst is still coming in: let it land in one flush
        super()._do_flush()
        # What flush() kept back counts toward the next full buffer.
        self._count = itertools.count(self._buffer.qsize() + self._pending.qsize() + 1)

    def _waits(self) -> bool:
        """Joining only: True when the engine has no row for any buffered message."""
        if not self.engine_rows:
            return False
        room, batch_room = self._rooms()
        if self._fits(False, room, batch_room):
            return False  # a batch line fits: so does a call
        calls = any(is_interactive(request) for request in self._buffer.queue)
        return not (calls and self._fits(True, room, batch_room))

    def _rooms(self) -> tuple[int, int]:
        """Joining only: the engine's rows free for a job, and for a batch line."""
        return self.engine_rows - len(self._held), self.batch_rows - len(self._held_batch)

    def _fits(self, call: bool, room: int, batch_room: int) -> bool:
        """Joining only: whether a new job finds a row, given ``room`` and ``batch_room``
        (:meth:`_rooms`). A call takes any free row, or, with every row taken, one of the
        interactive margin that held batch lines leave free; a batch line needs a row
        free for batch lines."""
        if call:
            return room > 0 or bool(self._held_batch)
        return room > 0 and batch_room > 0

    def _fitting(self, requests: list[Request]) -> tuple[list[Request], list[Request]]:
        """Joining only: ``requests`` split into interactive calls and batch lines, of each
        those the engine has rows for (all of them where ``engine_rows`` is 0).

        A call fits past held batch lines even with every row taken: batch lines leave the
        interactive margin free in the engine. A second message for a job held here, or
        fitted in this flush, always fits and takes no row (it waits for the first's run).
        The others are buffered again, first in line for the next tick.
        """
        room, batch_room = self._rooms()
        marked = sorted(
            ((request, is_interactive(request)) for request in requests), key=lambda m: not m[1]
        )
        calls: list[Request] = []
        lines: list[Request] = []
        fitted: set[str] = set()
        for request, call in marked:
            if not self.engine_rows or request.id in self._held or request.id in fitted:
                fits = True
            else:
                fits = self._fits(call, room, batch_room)
                room -= fits
                batch_room -= fits and not call
            if not fits:
                self._buffer.put_back(request)
                continue
            fitted.add(request.id)
            if call:
                calls.append(request)
            else:
                lines.append(request)
        return calls, lines

    def _hold(self, requests: list[Request]) -> list[Request]:
        """Joining only: hold ``requests`` by job id; return those to send (a second
        message for a job held here waits for the run in flight)."""
        first = []
        for request in requests:
            held = self._held.setdefault(request.id, [])
            if not held:
                first.append(request)
            held.append(request)
        return first

    def _arrival(self, request: Request, first: bool) -> None:
        """A message came in: on a joining engine, flush it soon (not at the timer's tick)
        when it found the worker idle and the buffer empty (a lone job), or when it is an
        interactive call and batch lines run (it goes ahead of them). Otherwise flushes keep
        the timer's cadence: flushing early whenever no flush came for an interval split a
        backlog into small flushes, each with its claim and commit (a tenth of the tiny
        model's throughput, measured)."""
        if not self.joins or self._leaving or self._early:
            return
        lone = first and not self._held
        if not (lone or (self._held_batch and is_interactive(request))):
            return
        loop = get_event_loop()
        if loop is not None:
            self._early = True
            loop.call_later(JOIN_GATHER_S, self._early_flush)  # type: ignore[no-untyped-call]

    def _early_flush(self) -> None:
        self._early = False
        self._do_flush()

    def _arriving(self) -> bool:
        """True while a partial buffer still grows (and has not waited its longest)."""
        size = self._buffer.qsize()
        if not self.group_size or not 0 < size < self.group_size:
            return False
        now, interval = time.monotonic(), float(self.flush_interval)
        return (
            now - self._buffer.last < interval / 2
            and now - self._buffer.first < ARRIVAL_WAIT_INTERVALS * interval
        )

    def flush(self, requests: Collection[Request]) -> Any:
        """Send ``requests`` to the pool as one call; ack after it returns, requeue if it dies.

        Past whole groups, the newest messages stay buffered for the next flush.
        """
        if self.joins:
            return self._flush_joining(list(requests))
        requests = list(requests)
        if self.offers is not None:
            # Interactive messages first, so none is among those kept back.
            requests.sort(key=lambda request: not is_interactive(request))
        extra = len(requests) % self.group_size if self.group_size else 0
        if extra and len(requests) > self.group_size:
            requests, kept = requests[:-extra], requests[-extra:]
            for request in kept:
                self._buffer.put_back(request)
        serializable = ([lean(r) for r in requests],)
        self._tell_received(requests)
        self._running += 1
        self._flushing.append(requests)
        if self.offers is not None:
            self.offers.open()

        def on_return(result: Any) -> None:
            self._running = max(0, self._running - 1)
            self._forget_flush(requests)
            committed, handed_back = flush_outcome(result)
            if not committed:
                log.error("batch of %d not committed; requeueing its messages", len(requests))
            asked, self._excess = self._excess, 0
            settled = requests
            if handed_back and committed and not self._leaving and not asked:
                # Offered at its very end, not started: buffered again for the next flush.
                # (Handed back above this worker's share, they go back to their lanes.)
                settled = [request for request in requests if request.id not in handed_back]
                for request in requests:
                    if request.id in handed_back:
                        self._buffer.put_back(request)
                handed_back = frozenset()
            excess = asked - len(handed_back)
            if excess > 0 and not self._leaving:
                self._shed(excess)
            if not self._buffer.empty() and not self._leaving:
                self._do_flush()
            done = partial(
                settle, settled, committed=committed, handed_back=handed_back, now=self._leaving
            )
            # The pool process gets its next flush before the acks go out (one Redis
            # round trip each, ~45 ms for 256 on one core, in this same loop).
            loop = get_event_loop()
            if loop is None or self._leaving:
                done()
            else:
                loop.call_soon(done)  # type: ignore[no-untyped-call]

        def on_error(exc: BaseException) -> None:
            self._running = max(0, self._running - 1)
            self._forget_flush(requests)
            log.error("batch of %d lost (%r); requeueing its messages", len(requests), exc)
            settle(requests, committed=False, now=self._leaving)

        return self._pool.apply_async(
            apply_batches_task,
            (self, serializable, 0, None),
            callback=on_return,
            error_callback=on_error,
        )

    def _flush_joining(self, requests: list[Request]) -> Any:
        """Send ``requests`` to the model process, where they join the running jobs.

        The task returns once they are handed over; they are settled as the model
        process reports them (:meth:`report`), or requeued if the task fails or dies.
        """
        calls, lines = self._fitting(requests)
        calls, lines = self._hold(calls), self._hold(lines)
        self._held_batch.update(request.id for request in lines)
        # Interactive calls go as a flush of their own, ahead of the batch lines: each flush
        # is read, claimed and tokenized whole before its first row reaches the engine.
        if not calls and not lines:
            return None
        self._tell_received(calls + lines)
        sent = None
        for part in (calls, lines):
            if part:
                sent = self._send_joining(part)
        return sent

    def _send_joining(self, requests: list[Request]) -> Any:
        """Hand ``requests`` (held already) to the model process in one flush task."""
        job_ids = [request.id for request in requests]
        self._running += 1

        def on_return(result: Any) -> None:
            self._running = max(0, self._running - 1)
            if result is not True:
                log.error("batch of %d not handed over; requeueing its messages", len(job_ids))
                self.settle_jobs(job_ids, committed=False)
            else:
                # A job reported before this return was settled already.
                self._taken.update(job_id for job_id in job_ids if job_id in self._held)

        def on_error(exc: BaseException) -> None:
            self._running = max(0, self._running - 1)
            log.error("batch of %d lost (%r); requeueing its messages", len(job_ids), exc)
            self.settle_jobs(job_ids, committed=False)

        return self._pool.apply_async(
            apply_batches_task,
            (self, ([lean(r) for r in requests],), 0, None),
            callback=on_return,
            error_callback=on_error,
        )

    def report(self, job_id: str, committed: bool) -> None:
        """The model process reports a job committed (ack its messages) or given up (requeue)."""
        self.settle_jobs([job_id], committed=committed)

    def settle_jobs(self, job_ids: Collection[str], *, committed: bool) -> None:
        """Acknowledge (or requeue) every message held for these jobs; others were settled."""
        for job_id in job_ids:
            self._taken.discard(job_id)
            self._held_batch.discard(job_id)
            settle(self._held.pop(job_id, []), committed=committed, now=self._leaving)

    def requeue_held(self) -> None:
        """The model process is gone: requeue every message it held, at once."""
        if self._held:
            count = sum(len(held) for held in self._held.values())
            log.error("the model process ended holding %d message(s); requeueing them", count)
            self.settle_jobs(list(self._held), committed=False)

    def running_jobs(self) -> bool:
        """True while jobs handed to the model process have not been reported."""
        return bool(self._taken)

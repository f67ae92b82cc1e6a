"""The worker's dispatcher: releases its tenants' jobs to its model's queue, fairly, and
holds no more than its share of them.

Jobs wait in per-tenant lane queues (:mod:`completion_queue.fair`). A thread of
the worker's main process keeps the worker holding its share of the model's work:
whenever it holds fewer, it releases the difference from the lane queues to the
model's queue, in the order of the virtual token counter, and the Celery consumer
takes them from there. It runs when a producer publishes on the model's wake
channel (so a job sent to an idle worker is released at once) and every
:data:`POLL_S` (so a worker that finished a flush refills), and copies the
tenants' weights from the database every :data:`WEIGHTS_EVERY_S`.

The share: each step records in Redis how many messages this worker holds and
whether its model is loaded (:data:`completion_queue.fair.SHARE`, for
:data:`HELD_TTL_S`), and reads back the model's work (what waits in its queues
plus what every worker holds) and its ready workers. A worker holds at most
``min(prefetch, ceil(work / ready workers))``: alone, the whole backlog up to its
prefetch, as before; a worker that joins takes an equal part. One holding more
than a group above its share asks its running flush to hand back its unstarted
groups (:meth:`workers.runner.ClaimGate.hand_back_once`): the flush ends after the
group it runs, and when it returns their messages go back to their lane queues,
with the newest buffered ones up to the excess (:meth:`workers.task.ModelBatches.hand_back`),
where the workers below their share release them. A worker whose model is still loading releases
nothing and does not count as ready, so the others do not leave it a share, with one
exception: a worker *joining*, one that has loaded for less than :data:`JOIN_SLACK` times
what the model's last load took (recorded in Redis by each worker once ready), counts
for the workers that can hand back (the static engine). Their unstarted groups go
back at their next group boundary, while it loads, so its part waits for it in the
queue when it is ready, instead of a group later; if it loads no sooner, it stops
counting and the others take that part back.
Released messages land in the model's one queue, so each step also caps what the
worker's consumer takes from it at its share (kombu's ``prefetch_count``): one
worker's consumer does not take another's share.

Interactive calls are released past that hold, up to a margin of one group
(:func:`completion_queue.interactive_margin`, which the Celery prefetch leaves room for):
a call posted while the worker holds a full backlog of batch lines reaches it at once,
and the running flush runs it between two decoding steps (:mod:`workers.interactive`).

A consumer step: it starts once the worker consumes, and stops with the
consumer, before a warm shutdown hands back what the worker holds, so a
stopping worker releases nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from celery import bootsteps

from completion_queue import (
    TASK_GENERATE,
    FairQueues,
    Settings,
    interactive_margin,
    prefetch_count,
    queue_name,
    redact_url,
)
from completion_queue.fair import Settled, fair_share, job_cost, wake_channel
from db import Job, JobStatus, Outcome, make_engine, make_session_factory, tenant_weights
from workers.listeners import BatchListener

log = logging.getLogger(__name__)

#: How often a dispatcher releases without being woken (a flush that finished frees room).
POLL_S = 0.1

#: How often the tenants' weights are read again from the database.
WEIGHTS_EVERY_S = 10.0

#: How long a worker's held count counts after its last step (a dead worker's drops out).
HELD_TTL_S = 3.0

#: After asking the running flush to hand back, wait this long before asking again: its
#: messages go back only when the group it runs ends.
HAND_BACK_EVERY_S = 2.0

#: A loading worker counts in the others' shares until it has loaded for this many times
#: the model's last load time.
JOIN_SLACK = 3.0


def held_count(channel: Any) -> int:
    """How many messages ``channel`` holds: delivered and not yet acknowledged.

    Read from another thread than the event loop's: ``len`` of kombu's dicts is
    atomic, where iterating them is not.
    """
    qos = channel.qos
    return len(qos._delivered) - len(qos._dirty)


class Dispatcher:
    """Release one model's jobs so that this worker holds its share, at most ``target``."""

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        *,
        target: int,
        held: Callable[[], int | None],
        node: str = "",
        ready: Callable[[], bool] = lambda: True,
        hand_back: Callable[[int], None] | None = None,
        slack: int = 0,
        limit: Callable[[int], None] | None = None,
        weights: Callable[[], Mapping[str, float]] | None = None,
        margin: int = 0,
    ) -> None:
        """``held``: what this worker holds (None: take nothing now); ``node``: its name,
        under which its held count is shared; ``ready``: whether its model is loaded;
        ``hand_back``: asks the worker to hand back what it holds above its share and has
        not started (called with that count), when it holds more than ``slack`` above;
        ``limit``: caps what the worker's consumer takes from the model's queue;
        ``margin``: interactive messages this worker may hold past its share."""
        self.client = client
        self.queue = queue
        self.target = target
        self.margin = margin
        self.held = held
        self.node = node
        self.ready = ready
        self.hand_back = hand_back
        self.slack = slack
        self.limit = limit
        self.weights = weights
        self.fair = FairQueues(client, queue)
        self._asked_at = -HAND_BACK_EVERY_S
        self._started = time.monotonic()
        #: The model's last load time, read at the first step (0: none recorded).
        self._last_load_s: float | None = None
        self._load_recorded = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the dispatching thread."""
        self._thread = threading.Thread(target=self._run, name="cq-dispatch", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop releasing; wait for the thread to end; withdraw this worker's held count."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        try:
            self.fair.forget(self.node)
        except Exception as exc:  # the broker is away: the count expires by itself
            log.warning("dispatcher: held count not withdrawn: %s", redact_url(str(exc)))

    def step(self) -> int:
        """Release what this worker has room for; return how many were released."""
        held = self.held()
        if held is None:
            return 0
        ready = self.ready()
        joining = not ready and self._joining()
        work, workers, joiners = self.fair.share(
            self.node, held=held, ready=ready, joining=joining, ttl_s=HELD_TTL_S
        )
        if not ready:
            # The model is loading: the ready workers take the backlog meanwhile.
            if self.limit is not None:
                self.limit(held)
            return 0
        if not self._load_recorded:
            self._load_recorded = True
            self.fair.loaded(time.monotonic() - self._started)
        if self.hand_back is not None:
            # Leave joining workers their part now: handed back at the running group's end,
            # it waits for them in the queue (see the module's doc).
            workers += joiners
        share = fair_share(work, workers, self.target)
        # Interactive calls go past a hold that is the whole prefetch (a worker alone, or
        # one whose part of the backlog fills it), not past a part that other ready
        # workers' parts make smaller: those calls are theirs to take.
        margin = self.margin if workers <= 1 or share >= self.target else 0
        if self.limit is not None:
            # Released messages land in the model's one queue: without a cap, whichever
            # consumer asks first would take another worker's share. Alone, it has no one
            # to take from: capped at what exists now, a burst still coming in would be
            # flushed in pieces (it could take each new job only at the next step). The
            # margin lets interactive calls released past the share in.
            self.limit((share if workers > 1 else self.target) + margin)
        now = time.monotonic()
        if self.hand_back is not None and held > share + self.slack:
            if now - self._asked_at >= HAND_BACK_EVERY_S:
                self._asked_at = now
                log.info("holding %d of a share of %d: handing back unstarted groups", held, share)
                self.hand_back(held - share)
            return 0
        released = self.fair.release(share - held)
        if margin:
            # What the first release moved waits in the model's queue: the script counts it.
            released += self.fair.release(share + margin - held, lane="interactive")
        return released

    def _joining(self) -> bool:
        """True while this worker has loaded for less than :data:`JOIN_SLACK` times the
        model's last load time (the others then leave it a part)."""
        if self._last_load_s is None:
            self._last_load_s = self.fair.load_s() or 0.0
        return time.monotonic() - self._started < JOIN_SLACK * self._last_load_s

    def _copy_weights(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Copy the tenants' weights to Redis; with the database away, keep the last ones
        (releasing does not wait for the database)."""
        try:
            weights = read()
        except Exception as exc:
            log.warning("dispatcher: tenants' weights not read: %s", redact_url(str(exc)))
            return
        self.fair.set_weights(weights)

    def _run(self) -> None:
        pubsub = None
        weights_at = 0.0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(wake_channel(self.queue))
                if self.weights is not None and time.monotonic() >= weights_at:
                    weights_at = time.monotonic() + WEIGHTS_EVERY_S
                    self._copy_weights(self.weights)
                self.step()
                pubsub.get_message(timeout=POLL_S)
            except Exception as exc:  # the broker or the database is away: try again
                log.warning("dispatcher: %s", redact_url(str(exc)))
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                self._stop.wait(1.0)
        if pubsub is not None:
            pubsub.close()


class FairCharges(BatchListener):
    """Settle each finished job's charge in the model process: its tenant was charged the
    job's estimated tokens at release; the row now says what it took (prompt plus generated).
    A job found cancelled or finished when claimed gets its release's charge back."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.broker_url = broker_url
        self.queue = queue
        self._fair: FairQueues | None = None

    def _queues(self) -> FairQueues:
        if self._fair is None:
            client = redis.Redis.from_url(self.broker_url, socket_timeout=5)
            self._fair = FairQueues(client, self.queue)
        return self._fair

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """Give back what the skipped jobs' releases charged: they take nothing now."""
        if skipped:
            self._queues().settle(Settled(str(job_id)) for job_id in skipped)

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """Charge (or give back) each job's tenant the difference between what it took and
        what it was charged, and move the new-token ratios by what the succeeded jobs
        generated."""
        by_id = {job.id: job for job in jobs}
        settled = []
        for outcome in outcomes:
            job = by_id[outcome.job_id]
            prompt, new = job_cost(job)
            took = (outcome.prompt_tokens or 0) + outcome.completion_tokens
            succeeded = outcome.status is JobStatus.SUCCEEDED
            generated = outcome.completion_tokens if succeeded else -1
            settled.append(Settled(str(job.id), job.tenant or "", took, prompt, new, generated))
        self._queues().settle(settled)


class DispatchStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Run a :class:`Dispatcher` for the worker's model while the consumer runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.dispatcher: Dispatcher | None = None

    def start(self, consumer: Any) -> None:
        """Start releasing for the worker's model."""
        state = consumer.app.cq_state
        settings: Settings = state.settings

        def held() -> int | None:
            task_consumer = getattr(consumer, "task_consumer", None)
            if task_consumer is None:
                return None  # reconnecting: release nothing until consuming again
            if state.gate.closed:
                return None  # stopping: take nothing more (see workers.leave)
            return held_count(task_consumer.channel)

        def limit(most: int) -> None:
            task_consumer = getattr(consumer, "task_consumer", None)
            if task_consumer is not None:
                # kombu's consumer takes messages while it holds fewer; 0 would mean no cap.
                task_consumer.channel.qos.prefetch_count = max(1, most)

        sessions = make_session_factory(make_engine(settings.resolved_database_url()))

        def weights() -> dict[str, float]:
            with sessions() as session:
                return tenant_weights(session)

        client = redis.Redis.from_url(consumer.app.conf.broker_url, socket_timeout=5)
        task = consumer.app.tasks[TASK_GENERATE]

        def hand_back(excess: int) -> None:
            task.hand_back(excess)  # before the gate: the flush's return reads it
            state.gate.hand_back_once()

        self.dispatcher = Dispatcher(
            client,
            queue_name(settings.model),
            target=prefetch_count(settings),
            held=held,
            node=consumer.hostname,
            ready=lambda: state.loaded.load_s is not None,
            # vLLM's running jobs join at each step: there is no unstarted group to hand back.
            hand_back=hand_back if settings.engine == "static" else None,
            slack=settings.batch_size,
            limit=limit,
            weights=weights,
            margin=interactive_margin(settings),
        )
        self.dispatcher.start()

    def stop(self, consumer: Any) -> None:
        """Stop releasing (a stopping or reconnecting worker takes nothing more)."""
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher.client.close()
            self.dispatcher = None

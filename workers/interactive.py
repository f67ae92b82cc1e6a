"""Interactive calls into a running flush: a busy worker runs them between two decoding steps.

A worker busy with batch lines holds a flush running (up to ``CQ_BATCH_LOOKAHEAD``
groups) and the next one forming. An interactive call (a caller holds its connection
open) must not wait for both, nor for the group that runs when it comes:

- it reaches the busy worker at once: the dispatcher releases interactive messages
  past the worker's hold, up to one group more (:mod:`workers.dispatch`);
- the main process hands its job id to the running flush (:meth:`Offers.offer`)
  instead of buffering it, and adds its message to that flush's, settled with them
  (acknowledged once the flush's results are committed, requeued if it dies); only a
  flush that holds batch lines takes offers (one of interactive calls alone ends soon,
  and the call then goes with the rest in whole groups);
- the model process looks for offers after every decoding step of the group it runs
  (:class:`Interjection`, called by the group's :class:`~workers.progress.Watch`): it
  reads and plans the offered jobs, claims them, generates them to the end in a group
  of their own, and commits their results, then the paused group takes its next step.
  Its rows and KV cache wait in memory meanwhile. What is offered while no group
  generates (between two groups) is taken before the next group is claimed
  (:meth:`workers.runner.BatchRunner.run_flush`).

So a call waits for one decoding step, not for a group or a flush, and the flush's
groups are neither handed back nor planned again. Batch lines are not starved: after
running offered calls for some time, a flush runs its own group at least as long before
it takes more (interactive calls get at most half the engine while batch lines wait;
at a group boundary, one of the flush's own groups runs after a group of offered jobs).
An offer and the flush's end cannot cross: the main process offers holding a lock, only
while the flush takes offers; the flush's last look takes what is left and closes them
under that lock, so every offered job is run by that flush, or handed back unstarted
(the main process then buffers its message again, for the next flush).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from completion_queue.fair import lane_of_queue

log = logging.getLogger(__name__)

#: Longest the main process waits for the offers' lock (the flush holds it for a drain).
LOCK_WAIT_S = 0.5


class Offers:
    """Job ids the main process hands to the model process's running flush.

    Made before the pool forks; shared by both processes. The main process
    :meth:`opens <open>` it when it sends a flush and :meth:`offers <offer>` while it is
    open; the flush :meth:`takes <take>` after each decoding step and at each group boundary,
    and closes it at its end.
    """

    def __init__(self) -> None:
        self._lock = multiprocessing.Lock()
        self._open = multiprocessing.Event()
        self._ids: multiprocessing.SimpleQueue[str] = multiprocessing.SimpleQueue()
        #: The lock was found held past its wait: see :meth:`offer`.
        self._stuck = False

    def open(self) -> None:
        """A flush is being sent: it takes offers until it closes them."""
        self._open.set()

    def offer(self, job_id: str) -> bool:
        """Hand ``job_id`` to the running flush; False if it takes no more (it ends), or
        the lock is not free within :data:`LOCK_WAIT_S`: a model process killed while it
        held it leaves it held for good, so from then on this worker offers nothing (its
        calls are buffered, as with no flush running) and its event loop, which offers,
        never waits on a dead process again."""
        if self._stuck:
            return False
        if not self._lock.acquire(timeout=LOCK_WAIT_S):
            self._stuck = True
            log.warning("the interactive offers' lock stays held: offering no more calls")
            return False
        try:
            if not self._open.is_set():
                return False
            self._ids.put(job_id)  # a pipe write: the flush sees it once this returns
            return True
        finally:
            self._lock.release()

    def take(self, *, close: bool = False) -> list[str]:
        """Return the ids offered since the last look; ``close``: and take no more."""
        if not close:
            return self._drain()
        with self._lock:
            self._open.clear()
            return self._drain()

    def _drain(self) -> list[str]:
        taken = []
        while not self._ids.empty():
            taken.append(self._ids.get())
        return taken


class Interjection:
    """Runs the calls offered to a flush between two decoding steps of its running group.

    Called after every step (:attr:`workers.progress.Watch.between`); ``run`` claims,
    generates and commits the offered jobs it is given (the runner's). Not reentrant: the
    offered jobs' own steps call it too, and do nothing. An error of ``run`` is not the
    paused group's: it is kept in :attr:`error`, and the flush raises it once that group
    returns (as it would have at its next commit).
    """

    def __init__(
        self,
        offers: Offers,
        run: Callable[[list[str]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.offers = offers
        self.run = run
        self.clock = clock
        self.error: Exception | None = None
        self._inside = False
        #: No offers are taken before then: the paused group's turn (see the module's doc).
        self._not_before = 0.0

    def __call__(self) -> None:
        if self._inside or self.error is not None or self.clock() < self._not_before:
            return
        taken = self.offers.take()
        if not taken:
            return
        self._inside = True
        started = self.clock()
        try:
            self.run(taken)
        except Exception as exc:
            self.error = exc
        finally:
            self._inside = False
            ended = self.clock()
            self._not_before = ended + (ended - started)

    def raise_error(self) -> None:
        """Raise what :attr:`run` raised, once the paused group has returned."""
        if self.error is not None:
            raise self.error


def is_interactive(request: Any) -> bool:
    """True when a message came from an interactive lane (its routing key, the lane queue
    it was sent to: :func:`completion_queue.fair.lane_queue`)."""
    info = getattr(request, "delivery_info", None) or {}
    return lane_of_queue(str(info.get("routing_key") or "")) == "interactive"

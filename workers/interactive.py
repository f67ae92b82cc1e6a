"""Interactive calls into a running flush: a busy worker runs them at its next group boundary.

A worker busy with batch lines holds a flush running (up to ``CQ_BATCH_LOOKAHEAD``
groups) and the next one forming. An interactive call (a caller holds its connection
open) must not wait for both:

- it reaches the busy worker at once: the dispatcher releases interactive messages
  past the worker's hold, up to one group more (:mod:`workers.dispatch`);
- the main process hands its job id to the running flush (:meth:`Offers.offer`)
  instead of buffering it, and adds its message to that flush's, settled with them
  (acknowledged once the flush's results are committed, requeued if it dies); only a
  flush that holds batch lines takes offers (one of interactive calls alone ends soon,
  and the call then goes with the rest in whole groups);
- the model process takes what was offered before it claims each group
  (:meth:`workers.runner.BatchRunner.run_flush`), reads and plans those jobs, and runs
  them next, in groups of their own, then goes on with the flush as planned.

So a call waits for the group running when it comes, not for a flush, and the flush's
other groups are neither handed back nor planned again. Batch lines are not starved:
after a group of offered jobs, the flush runs one of its own groups before it takes
more. An offer and the flush's end cannot cross: the main process offers holding a
lock, only while the flush takes offers; the flush's last look takes what is left and
closes them under that lock, so every offered job is run by that flush, or handed back
unstarted (the main process then buffers its message again, for the next flush).
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

from completion_queue.fair import lane_of_queue

log = logging.getLogger(__name__)

#: Longest the main process waits for the offers' lock (the flush holds it for a drain).
LOCK_WAIT_S = 0.5


class Offers:
    """Job ids the main process hands to the model process's running flush.

    Made before the pool forks; shared by both processes. The main process
    :meth:`opens <open>` it when it sends a flush and :meth:`offers <offer>` while it is
    open; the flush :meth:`takes <take>` at each group boundary, and closes it at its end.
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


def is_interactive(request: Any) -> bool:
    """True when a message came from an interactive lane (its routing key, the lane queue
    it was sent to: :func:`completion_queue.fair.lane_queue`)."""
    info = getattr(request, "delivery_info", None) or {}
    return lane_of_queue(str(info.get("routing_key") or "")) == "interactive"

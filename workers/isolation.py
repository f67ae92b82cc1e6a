"""Who shares the engine: flushes running side by side, and a suspect job that runs alone.

On the vLLM engine several flushes generate at once, each in its own thread of
the model process. A job that crashed its model process twice runs alone
(``SUSPECT_AFTER_ATTEMPTS`` in :mod:`workers.runner`), so that another crash
takes no batch-mate with it: here that means alone in the engine, not only in
its flush. :class:`Isolation` is a shared/exclusive lock around each generate
call: a suspect waits for the calls running to end, and calls that come after it
wait until it has ended (it goes first, so a steady stream of flushes cannot
starve it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Isolation:
    """Generate calls share the engine; a suspect job's call has it alone."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the engine beside other shared calls (after any suspect waiting or running)."""
        with self._changed:
            while self._alone or self._waiting_alone:
                self._changed.wait()
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Hold the engine alone: wait for the calls running, keep new ones waiting."""
        with self._changed:
            self._waiting_alone += 1
            while self._alone or self._sharing:
                self._changed.wait()
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()

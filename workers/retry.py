"""Retrying the database while it is away: a runner's transactions, with doubling backoff."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential,
)

from completion_queue import redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff between database retries: first delay and longest delay, in seconds.
DB_RETRY_FIRST_S, DB_RETRY_MAX_S = 0.1, 5.0


def database_unreachable(exc: BaseException) -> bool:
    """True for errors that mean "try the database again later", not "this write is wrong"."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    message = str(exc).splitlines()[0] if str(exc) else repr(exc)
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("database unavailable (%s); retrying in %.1fs", redact_url(message), delay)


def retry_database(work: Callable[[], T], *, within_s: float) -> T:
    """Run ``work`` (one transaction), retrying with doubling backoff while the database is away.

    Only errors that mean "try again later" (:func:`database_unreachable`) are
    retried, and none is begun past ``within_s`` seconds; then the last one is raised.
    """
    retrying = Retrying(
        retry=retry_if_exception(database_unreachable),
        stop=stop_before_delay(within_s),
        wait=wait_exponential(multiplier=DB_RETRY_FIRST_S, max=DB_RETRY_MAX_S),
        before_sleep=_log_retry,
        reraise=True,
    )
    return retrying(work)

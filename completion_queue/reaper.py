"""The reaper: recovers jobs whose messages will never come back, and expires unserved jobs.

Redis gives an unacknowledged message back after the visibility timeout, so a
worker that dies loses no job, as long as Redis keeps the message. The reaper
covers what Redis cannot: a job left ``running`` past ``CQ_REAP_RUNNING_AFTER_S``
(its message was lost with a Redis that had no persistence, or was deleted) is
put back to ``queued`` and sent a new message, in one transaction; a job queued
past ``CQ_QUEUE_TIMEOUT_S`` (no worker serves its model) fails with
``QueueTimeout``; a job still queued past its deadline fails with ``DeadlineExceeded``,
or ``BatchExpired`` for a line of an OpenAI-style batch, whose deadline is its 24 h
completion window (the batch then reads as ``expired``); workers fail such jobs too
when their messages arrive. Every change is
fenced on the row's status and attempt, so a late result of the old attempt is
discarded and two reapers never double a job.

It runs as ``cq reap`` and, every ``CQ_REAP_INTERVAL_S``, on the timer of each
worker's main process (:class:`workers.app.ReaperStep`). It lives here, beside
the Celery app, because it needs the database and the broker but not the model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import astuple, dataclass
from datetime import datetime, timedelta

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from completion_queue.celery_app import queue_depth, send_jobs
from completion_queue.constants import queue_name
from completion_queue.deadlines import DEADLINE_ERRORS
from completion_queue.errors import AttemptsExceeded, QueueTimeout
from completion_queue.settings import Settings
from db import (
    error_dict,
    expire_queued_jobs,
    fail_attempts,
    fail_past_deadline,
    old_queued_jobs,
    requeue_jobs,
    stuck_jobs,
    utcnow,
)

log = logging.getLogger(__name__)

#: Most stuck jobs one reaper pass takes on; the next pass takes the rest.
REAP_LIMIT = 1000

#: The Redis hash where kombu keeps delivered, unacknowledged messages.
UNACKED_KEY = "unacked"


@dataclass(frozen=True, slots=True)
class ReapReport:
    """What one reaper pass changed."""

    requeued: int
    failed: int
    expired: int
    resent: int = 0
    past_deadline: int = 0


def reap(settings: Settings, app: Celery, sessions: sessionmaker[Session]) -> ReapReport:
    """Run one reaper pass: expire unserved queued jobs, requeue (or fail) stuck running ones."""
    now = utcnow()
    with sessions.begin() as session:
        past_deadline = fail_past_deadline(session, errors=DEADLINE_ERRORS)
    expired_error = error_dict(
        QueueTimeout(
            f"no worker took the job within {settings.queue_timeout_s:g}s (CQ_QUEUE_TIMEOUT_S); "
            "is a worker serving its model?"
        )
    )
    with sessions.begin() as session:
        expired = expire_queued_jobs(
            session,
            created_before=now - timedelta(seconds=settings.queue_timeout_s),
            error=expired_error,
        )
    exhausted_error = error_dict(AttemptsExceeded(settings.max_attempts))
    with sessions.begin() as session:
        stuck = stuck_jobs(
            session,
            started_before=now - timedelta(seconds=settings.reap_running_after_s),
            limit=REAP_LIMIT,
        )
        exhausted = [job for job in stuck if job[1] >= settings.max_attempts]
        failed = fail_attempts(session, jobs=exhausted, error=exhausted_error)
        requeued = requeue_jobs(
            session, jobs=[job for job in stuck if job[1] < settings.max_attempts]
        )
        # Sent inside the transaction: if the broker is down, the jobs stay running
        # and the next pass tries again.
        send_jobs(app, requeued)
    resent = _resend_lost(settings, app, sessions, now)
    report = ReapReport(
        requeued=len(requeued),
        failed=failed,
        expired=len(expired),
        resent=resent,
        past_deadline=len(past_deadline),
    )
    if any(astuple(report)):
        log.warning(
            "reaper: requeued %d stuck job(s), failed %d, expired %d, resent %d queued job(s), "
            "failed %d queued job(s) past their deadline",
            *astuple(report),
        )
    return report


def _resend_lost(
    settings: Settings, app: Celery, sessions: sessionmaker[Session], now: datetime
) -> int:
    """Send again the old queued jobs whose messages are provably gone; return how many.

    A worker killed between Redis's BRPOP and kombu's record of the unacked message
    loses that message: the job stays queued with nothing left to deliver it. When a
    job is queued past ``CQ_REAP_QUEUED_AFTER_S`` while its model's queue is empty and
    no message is unacknowledged anywhere, its message is gone; a new one is sent. (A
    duplicate would be harmless: the second delivery of a finished job changes nothing.)
    """
    with sessions() as session:
        old = old_queued_jobs(
            session,
            created_before=now - timedelta(seconds=settings.reap_queued_after_s),
            limit=REAP_LIMIT,
        )
    if not old:
        return 0
    broker = redis.Redis.from_url(app.conf.broker_url, socket_timeout=10)
    with contextlib.closing(broker):
        if broker.hlen(UNACKED_KEY):
            return 0
        idle = {m for m in {j.model for j in old} if queue_depth(broker, queue_name(m)) == 0}
    lost = [job for job in old if job.model in idle]
    return send_jobs(app, lost) if lost else 0

"""The heartbeat on the messages a worker holds: live work is never redelivered, dead work is.

kombu's Redis transport keeps each delivered, unacknowledged message in the
``unacked`` hash, scored in ``unacked_index`` by the time it was delivered; every
worker's restore sweep gives back to its queue any message scored more than the
visibility timeout ago. Alone, that forces a choice: a long timeout leaves a dead
worker's messages stuck for that long (an hour at kombu's default), a short one
hands a live worker's long batch to another worker.

So, as SQS consumers extend the visibility of what they still work on, each
worker's main process re-scores the messages it holds (buffered or running) to
"now" every quarter of ``CQ_VISIBILITY_TIMEOUT_S``. While it lives, its messages
never look old; when it dies, with its host or by SIGKILL, they are one timeout
past its last heartbeat, and the next sweep of any live worker (every
:func:`completion_queue.restore_interval_s`) gives them back. ``ZADD XX`` only
re-scores messages still held: one acknowledged or restored meanwhile is not
added back.

The same beat announces the worker and its model in Redis
(:mod:`completion_queue.presence`), so producers see at once which models are
served.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps

from completion_queue import Settings, announce, heartbeat_interval_s, redact_url, withdraw

log = logging.getLogger(__name__)


def held_tags(channel: Any) -> list[str]:
    """Return the delivery tags ``channel`` holds: delivered, not yet acknowledged."""
    qos = channel.qos
    return [tag for tag in list(qos._delivered) if tag not in qos._dirty]


def refresh(channel: Any, tags: list[str], now: float) -> int:
    """Score the held ``tags`` at ``now`` in kombu's unacked index; return how many changed."""
    if not tags:
        return 0
    with channel.conn_or_acquire() as client:
        return int(
            client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True, ch=True)
        )


class UnackedHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Re-score this worker's held messages every quarter of the visibility timeout, and
    announce the worker's model.

    A consumer step: Celery clears its timer when the broker connection is lost,
    and starts the consumer's steps again once it is back, so the heartbeat
    resumes with the new connection.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.tref: Any = None

    def start(self, consumer: Any) -> None:
        """Schedule the heartbeat on the main process's timer."""
        settings: Settings = consumer.app.cq_state.settings
        self.tref = consumer.timer.call_repeatedly(
            heartbeat_interval_s(settings), self.beat, (consumer,), priority=10
        )
        self.beat(consumer)

    def stop(self, consumer: Any) -> None:
        """Cancel the schedule (a warm shutdown gives the messages back itself); withdraw."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        try:
            with consumer.task_consumer.channel.conn_or_acquire() as client:
                withdraw(client, consumer.hostname)
        except Exception as exc:  # the broker is gone: the entry expires by itself
            log.debug("could not withdraw from the live workers: %s", redact_url(str(exc)))

    def beat(self, consumer: Any) -> None:
        """One heartbeat; a failure is logged, and the next beat tries again."""
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return  # not consuming yet, or reconnecting: nothing is held
        settings: Settings = consumer.app.cq_state.settings
        try:
            channel = task_consumer.channel
            refresh(channel, held_tags(channel), time.time())
            with channel.conn_or_acquire() as client:
                announce(
                    client,
                    consumer.hostname,
                    settings.model,
                    heartbeat_s=heartbeat_interval_s(settings),
                    chat=consumer.app.cq_state.loaded.chat,
                )
        except Exception as exc:
            log.warning("heartbeat on held messages failed: %s", redact_url(str(exc)))

"""Celery task events for batched jobs, so that Flower shows every job and its state.

celery-batches buffers messages and runs them as one call, so Celery never sends
the per-task ``task-received``, ``task-started`` and ``task-succeeded`` events
of its default strategy. :class:`JobEvents` sends them per job (task id = job
id) from the worker's own event dispatcher: received when a flush of messages
goes to the model process (one round trip per flush), started when the job is
claimed, succeeded or failed when its result is committed, revoked when the row
was finished or cancelled already.

What a job is (model, prompt head, max tokens, tenant) travels in its message's
``kwargsrepr`` header, written by ``send_jobs`` from the row it has in hand, so
the received event carries it to Flower without a database read here.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery, bootsteps

from db import Job, JobStatus, Outcome
from workers.listeners import BatchListener

log = logging.getLogger(__name__)

#: Most task events the model process's own dispatcher puts in one message.
EVENTS_PER_MESSAGE = 1000


class JobEvents(BatchListener):
    """Sends one job's task events through the consumer's event dispatcher.

    In a pool child process (a prefork pool), which must not share the consumer's
    connection, it sends through a dispatcher of its own, opened on first use.
    """

    def __init__(self, app: Celery | None = None) -> None:
        self.app = app
        self.dispatcher: Any = None
        self.owner_pid = os.getpid()
        self.hostname = ""
        self._own: Any = None
        self._own_pid = 0

    def use(self, dispatcher: Any) -> None:
        """Send through ``dispatcher`` (the consumer's) from this process."""
        self.dispatcher, self.owner_pid = dispatcher, os.getpid()

    def _dispatcher(self) -> Any:
        if self.dispatcher is not None and self.owner_pid == os.getpid():
            return self.dispatcher
        if self.app is None or not self.hostname:
            return None
        if self._own_pid != os.getpid():
            connection = self.app.connection_for_write()
            # Task events buffered, as the consumer's dispatcher buffers them: each flush
            # publishes a group's events as one ``task.multi`` message (a list, which
            # Celery's event receiver and Flower read event by event), where one message
            # per event cost the model process about a twentieth of its time (the tiny
            # model on vLLM), time the engine's steps wait for.
            self._own = self.app.events.Dispatcher(
                connection,
                hostname=self.hostname,
                enabled=True,
                buffer_group={"task"},
                buffer_limit=EVENTS_PER_MESSAGE,
            )
            self._own_pid = os.getpid()
        return self._own

    def _send(self, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        dispatcher = self._dispatcher()
        if dispatcher is None or not dispatcher.enabled or not events:
            return
        # One pipelined round trip for the whole group, not one PUBLISH per event.
        with dispatcher.producer.batch(max_size=1000):
            for kind, fields in events:
                dispatcher.send(kind, **fields)
            # Task events are buffered until an event loop flushes them; the model
            # process has none, so send them now.
            dispatcher.flush()

    def received(self, requests: Sequence[Any]) -> None:
        """The messages of one flush were handed to the model process (one round trip)."""
        self._send(
            [
                (
                    "task-received",
                    {
                        "uuid": request.id,
                        "name": request.name,
                        "args": request.argsrepr,
                        "kwargs": request.kwargsrepr,
                        "root_id": request.root_id,
                        "parent_id": request.parent_id,
                        "retries": request.request_dict.get("retries", 0),
                    },
                )
                for request in requests
            ]
        )

    def claimed(self, jobs: Sequence[Job], *, skipped: Sequence[uuid.UUID], worker: str) -> None:
        """The claimed jobs start; skipped ones (finished or cancelled) count as revoked."""
        self.hostname = self.hostname or worker
        # The dispatcher adds hostname, pid and timestamp to every event.
        started = [("task-started", {"uuid": str(job.id)}) for job in jobs]
        revoked = [
            ("task-revoked", {"uuid": str(job_id), "terminated": False, "expired": False})
            for job_id in skipped
        ]
        self._send(started + revoked)

    def finished(
        self, jobs: Sequence[Job], outcomes: Sequence[Outcome], *, generation_s: float
    ) -> None:
        """Each job succeeded or failed; its runtime is its batch's generation time."""
        events: list[tuple[str, dict[str, Any]]] = []
        for outcome in outcomes:
            if outcome.status is JobStatus.SUCCEEDED:
                result = f"{outcome.completion_tokens} tokens in {len(outcome.choices)} choice(s)"
                events.append(
                    (
                        "task-succeeded",
                        {"uuid": str(outcome.job_id), "result": result, "runtime": generation_s},
                    )
                )
            elif outcome.status is JobStatus.CANCELLED:
                # Cancelled while it ran: its rows stopped, the tokens kept are in its row.
                revoked = {"uuid": str(outcome.job_id), "terminated": True, "expired": False}
                events.append(("task-revoked", revoked))
            else:
                error = outcome.error or {}
                events.append(
                    (
                        "task-failed",
                        {
                            "uuid": str(outcome.job_id),
                            "exception": f"{error.get('type')}: {error.get('message')}",
                            "traceback": "",
                        },
                    )
                )
        self._send(events)


def install_job_events(app: Celery, events: JobEvents) -> None:
    """Wire ``events`` into ``app``'s worker: its dispatcher and the buffered messages."""

    class JobEventsStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Hands the consumer's event dispatcher to :class:`JobEvents` (again on reconnect)."""

        requires = ("celery.worker.consumer.events:Events",)

        def start(self, consumer: Any) -> None:
            events.use(consumer.event_dispatcher)

        def stop(self, consumer: Any) -> None:
            events.use(None)

    app.steps["consumer"].add(JobEventsStep)

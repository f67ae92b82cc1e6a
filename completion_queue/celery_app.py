"""The Celery app both sides share: task names, queues and serialization, nothing heavy.

The producer imports this module to send; the worker imports it to consume.
It never imports torch, transformers or the database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from celery import Celery

from completion_queue.constants import TASK_GENERATE, queue_name
from completion_queue.errors import ConfigError
from completion_queue.settings import Settings, redact_url

#: Redis priorities: kombu's Redis transport pops lower numbers first.
PRIORITY_LEVELS = 10

#: How kombu's Redis transport names a queue's list for priority ``n`` > 0: ``queue + SEP + n``.
PRIORITY_SEPARATOR = "\x06\x16"


#: ``ssl_cert_reqs`` values that kombu and redis-py both read (``CERT_*`` becomes these).
CERT_REQS = ("required", "optional", "none")


def secure_broker_url(url: str) -> str:
    """Return ``url`` with its TLS options checked, verifying the server unless it says not to.

    kombu connects to a ``rediss://`` URL without ``ssl_cert_reqs`` with no
    certificate check at all, while redis-py checks; ``ssl_cert_reqs=required``
    makes every client verify. ``ssl_*`` options on a plain ``redis://`` URL are
    refused: kombu would speak TLS there and redis-py would not.
    """
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls = sorted(key for key in options if key.startswith("ssl_"))
    if parts.scheme != "rediss":
        if tls:
            raise ConfigError(
                f"{', '.join(tls)} need a rediss:// broker URL, got {redact_url(url)}"
            )
        return url
    reqs = options.get("ssl_cert_reqs", "required")
    options["ssl_cert_reqs"] = reqs.lower().removeprefix("cert_")
    if options["ssl_cert_reqs"] not in CERT_REQS:
        raise ConfigError(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)}, got {reqs!r}")
    check_hostname = options.get("ssl_check_hostname", "true")
    if check_hostname.lower() not in ("true", "false"):
        raise ConfigError(f"ssl_check_hostname must be true or false, got {check_hostname!r}")
    return urlunsplit(parts._replace(query=urlencode(options, safe="/", quote_via=quote)))


def tls_options(url: str) -> dict[str, Any]:
    """Return the ``ssl_*`` options of a checked ``rediss://`` URL as redis-py keywords."""
    options: dict[str, Any] = {
        key: value for key, value in parse_qsl(urlsplit(url).query) if key.startswith("ssl_")
    }
    if "ssl_check_hostname" in options:
        options["ssl_check_hostname"] = options["ssl_check_hostname"].lower() == "true"
    return options


def broker_url_file(settings: Settings) -> Path:
    """Return the file where ``cq up`` / ``cq demo`` publish their embedded broker's URL."""
    return settings.data_dir / "redis" / "broker.url"


def resolve_broker_url(settings: Settings) -> str:
    """Return ``CQ_BROKER_URL``, else the URL of the embedded broker a running ``cq up`` wrote."""
    if settings.broker_url:
        return settings.broker_url
    published = broker_url_file(settings)
    if published.is_file():
        return published.read_text().strip()
    raise ConfigError(
        "CQ_BROKER_URL is unset and no embedded broker is running: "
        "start one with `cq up` (or set CQ_BROKER_URL=redis://host:6379/0)"
    )


def celery_priority(priority: int) -> int:
    """Map a job priority (0 normal .. 9 most urgent) to kombu's Redis priority (0 first)."""
    return PRIORITY_LEVELS - 1 - priority


def queue_keys(queue: str) -> list[str]:
    """Return the Redis lists that hold ``queue``'s messages, most urgent first."""
    return [queue if n == 0 else f"{queue}{PRIORITY_SEPARATOR}{n}" for n in range(PRIORITY_LEVELS)]


def queue_depth(client: Any, queue: str) -> int:
    """Return how many messages wait in ``queue`` (all priorities; prefetched ones not counted)."""
    with client.pipeline(transaction=False) as pipe:
        for key in queue_keys(queue):
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())


#: How long a worker's restore sweep may hold kombu's ``unacked_mutex``. A sweep takes
#: milliseconds; a worker killed mid-sweep blocks everyone else's sweeps this long at
#: most (kombu's default, 300 s, would hold every dead worker's messages back that long).
UNACKED_MUTEX_EXPIRE_S = 10


def heartbeat_interval_s(settings: Settings) -> float:
    """Return how often a worker re-scores the messages it holds: a quarter of the timeout."""
    return settings.visibility_timeout_s / 4


def restore_interval_s(settings: Settings) -> int:
    """Return how often each worker sweeps for messages past the visibility timeout."""
    return max(1, min(10, int(settings.visibility_timeout_s // 4)))


def prefetch_count(settings: Settings) -> int:
    """Return how many messages a worker reserves: the flush running plus the next one forming."""
    return 2 * settings.batch_size * settings.batch_lookahead


class Sendable(Protocol):
    """What a message needs from a job: its id (the task id), model (the queue) and priority."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def model(self) -> str: ...
    @property
    def priority(self) -> int: ...


def send_jobs(app: Celery, jobs: Iterable[Sendable]) -> int:
    """Send one ``cq.generate`` message per job (task id = job id); return how many."""
    sent = 0
    # kombu's publish batch sends the LPUSHes in pipelines, not one round trip each.
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for job in jobs:
            app.send_task(
                TASK_GENERATE,
                task_id=str(job.id),
                queue=queue_name(job.model),
                priority=celery_priority(job.priority),
                producer=producer,
            )
            sent += 1
    return sent


def create_app(settings: Settings, broker_url: str | None = None) -> Celery:
    """Return a Celery app configured for completion-queue on ``broker_url``."""
    url = broker_url or resolve_broker_url(settings)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"broker_url must be a redis:// or rediss:// URL, got {redact_url(url)}")
    # Every client (kombu, and redis-py through app.conf.broker_url) reads this one URL.
    url = secure_broker_url(url)
    app = Celery("completion_queue", set_as_current=False)
    app.conf.update(
        broker_url=url,
        # The same options again, for Flower: its broker view reads them here, not in the URL.
        broker_use_ssl=tls_options(url) or None,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A held message comes back this long after its worker's last heartbeat
            # (workers/heartbeat.py re-scores live workers' messages).
            "visibility_timeout": settings.visibility_timeout_s,
            # How often each worker sweeps for messages past that timeout (kombu's
            # default is every ~100 s), and how long a dead sweeper can block the others.
            "unacked_restore_interval": restore_interval_s(settings),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(PRIORITY_LEVELS)),
            # kombu shares pooled connections between apps with the same host, port,
            # user, password and transport options, but not TLS options: naming them
            # here keeps an app from reusing a connection verified under other ones.
            "cq_tls": urlsplit(url).query if url.startswith("rediss://") else "",
        },
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        # Results live in SQL; Celery keeps none.
        task_ignore_result=True,
        result_backend=None,
        # Ack after the batch's results are committed; requeue if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Enough prefetch for the flush running plus the next one forming.
        worker_prefetch_multiplier=prefetch_count(settings),
        # Task events, so Flower shows every job: received, started, succeeded or
        # failed by the worker (workers/events.py), and optionally sent by the
        # producer (one more publish per job: about a third of submit throughput).
        worker_send_task_events=True,
        task_send_sent_event=settings.task_sent_events,
        task_default_queue=queue_name(settings.model),
    )
    return app

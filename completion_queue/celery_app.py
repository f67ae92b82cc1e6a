"""The Celery app both sides share: task names, queues and serialization, nothing heavy.

The producer imports this module to send; the worker imports it to consume.
It never imports torch, transformers or the database.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psutil
from celery import Celery

from completion_queue.constants import TASK_GENERATE, queue_name
from completion_queue.errors import BrokerNotRunning, ConfigError
from completion_queue.fair import (
    COST_HEADER,
    PRIORITY_LEVELS,
    job_cost,
    lane_of,
    lane_queue,
    register_lanes,
    waiting,
    wake,
)
from completion_queue.settings import Settings, redact_url

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


def broker_lock_file(settings: Settings) -> Path:
    """Return the file ``cq up`` / ``cq demo`` lock while they own the embedded broker; it
    holds their pid (see ``completion_queue.local``)."""
    return broker_url_file(settings).with_name("broker.lock")


#: How long a reader of the broker file waits for its server to accept a connection.
BROKER_FILE_CONNECT_TIMEOUT_S = 1.0


def broker_answers(url: str, *, timeout_s: float = BROKER_FILE_CONNECT_TIMEOUT_S) -> bool:
    """True when something accepts a connection at ``url``'s host and port (or unix socket)."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect(parts.path)
        elif parts.hostname:
            address = (parts.hostname, parts.port or 6379)
            socket.create_connection(address, timeout=timeout_s).close()
        else:
            return False
    except (OSError, ValueError):  # refused, timed out, or no port in the URL
        return False
    return True


def published_broker_url(settings: Settings) -> str | None:
    """Return the URL in the broker file (``""`` if empty), or None when there is no file."""
    try:
        return broker_url_file(settings).read_text().strip()
    except FileNotFoundError:
        return None


#: How long a command waits for a ``cq up`` that is starting to publish its broker's URL.
STARTING_BROKER_WAIT_S = 30.0


def _starting_broker_url(settings: Settings) -> str | None:
    """The URL a ``cq up`` still starting publishes, once it does; None if none is starting.

    ``cq up`` writes its pid into ``broker.lock`` before it starts redis-server
    (see ``completion_queue.local``); a live pid there with no URL yet is one starting.
    """
    lock = broker_lock_file(settings)
    deadline = time.monotonic() + STARTING_BROKER_WAIT_S
    while time.monotonic() < deadline:
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if pid == os.getpid() or not psutil.pid_exists(pid):
            return None
        url = published_broker_url(settings)
        if url:
            return url
        time.sleep(0.1)
    return None


def resolve_broker_url(settings: Settings) -> str:
    """Return ``CQ_BROKER_URL``, else the URL of the embedded broker a running ``cq up`` wrote.

    A command started together with ``cq up`` (``cq up &`` then ``cq submit``) waits
    for it to publish its URL. A broker file whose URL nothing answers (its ``cq up``
    was killed) is stale: it is removed, and the error names it.
    """
    if settings.broker_url:
        return settings.broker_url
    url = published_broker_url(settings)
    if url is None:
        url = _starting_broker_url(settings)
    if url and broker_answers(url):
        return url
    stale = ""
    if url is not None:
        published = broker_url_file(settings)
        try:
            # Unless a new `cq up` has just written its own URL there.
            if published.read_text().strip() == url:
                published.unlink()
        except OSError:
            pass
        stale = f"{published} is stale (nothing answers at {redact_url(url) or 'an empty URL'}); "
    raise BrokerNotRunning(
        "CQ_BROKER_URL is unset and no embedded broker is running: "
        f"{stale}start one with `cq up` (or set CQ_BROKER_URL=redis://host:6379/0)"
    )


def celery_priority(priority: int) -> int:
    """Map a job priority (0 normal .. 9 most urgent) to kombu's Redis priority (0 first)."""
    return PRIORITY_LEVELS - 1 - priority


def queue_depth(client: Any, queue: str) -> int:
    """Return how many messages wait for model ``queue``: in its tenants' lane queues and
    released to it (all priorities; those a worker took already are not counted)."""
    return sum(waiting(client, queue).values())


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


def flush_size(settings: Settings) -> int:
    """Return the most jobs one flush holds: ``CQ_BATCH_LOOKAHEAD`` groups of
    ``CQ_BATCH_SIZE``, read once and cut into groups (workers/runner.py)."""
    return settings.batch_size * settings.batch_lookahead


def prefetch_count(settings: Settings) -> int:
    """Return how many messages a worker reserves: the flush running plus the next one forming.

    A vLLM worker reserves one flush more, buffered in its main process (never claimed):
    its engine's rows that end are filled from there within a tick of the flush timer.
    """
    flushes = 3 if settings.engine == "vllm" else 2
    return flushes * flush_size(settings)


def interactive_margin(settings: Settings) -> int:
    """Return how many interactive messages a worker may hold past its prefetch: one group's
    worth, so that an interactive call reaches a busy worker at once (workers/dispatch.py)
    and runs between two decoding steps of the running flush (workers/interactive.py)."""
    return settings.batch_size


def most_held(settings: Settings) -> int:
    """Return the most messages a worker holds at once: its prefetch and the interactive
    margin past it."""
    return prefetch_count(settings) + interactive_margin(settings)


def engine_rows(settings: Settings) -> int:
    """Return the rows a vLLM worker's engine runs at once: two flushes and the margin."""
    return 2 * flush_size(settings) + interactive_margin(settings)


def batch_line_rows(settings: Settings) -> int:
    """Return the most rows of a vLLM worker's engine that batch lines take."""
    return engine_rows(settings) - interactive_margin(settings)


class Sendable(Protocol):
    """What a message needs from a job: its id (the task id), model (the queue) and priority."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def model(self) -> str: ...
    @property
    def priority(self) -> int: ...


def send_jobs(app: Celery, jobs: Iterable[Sendable]) -> int:
    """Send one ``cq.generate`` message per job (task id = job id) to its tenant's lane
    queue for its model (:mod:`completion_queue.fair`); return how many.

    The message carries the job's estimated prompt tokens and the most it may generate
    (header ``cq_cost``), which the workers' release step charges to the tenant. The lanes
    are recorded before any message lands, and the model's dispatchers are woken after.

    The task has no arguments (the row is the truth); its ``kwargsrepr`` says what the
    job is instead, as a dict literal: model, the prompt's first 60 characters (a chat's
    last message), ``max_new_tokens``, and the tenant when there is one. Celery's
    task-sent event and the worker's task-received event (workers/events.py) carry it as
    ``kwargs``, which Flower shows and searches (``kwargs:model=gpt2``). A job without a
    prompt (the reaper's resend knows only id, model and priority) is described by its
    model, and costs what a job without parameters does.
    """
    jobs = list(jobs)
    if not jobs:
        return 0
    lanes: dict[str, set[str]] = {}
    for job in jobs:
        tenant = getattr(job, "tenant", None) or ""
        lanes.setdefault(queue_name(job.model), set()).add(f"{lane_of(job)}|{tenant}")
    # kombu's publish batch sends the LPUSHes (and task-sent PUBLISHes) in pipelines.
    with app.producer_or_acquire() as producer:
        client = producer.channel.client
        for queue, members in lanes.items():
            register_lanes(client, queue, members)
        with producer.batch(max_size=1000):
            for job in jobs:
                app.send_task(
                    TASK_GENERATE,
                    task_id=str(job.id),
                    queue=lane_queue(
                        queue_name(job.model), getattr(job, "tenant", None), lane_of(job)
                    ),
                    priority=celery_priority(job.priority),
                    producer=producer,
                    headers={COST_HEADER: list(job_cost(job))},
                    argsrepr="()",
                    kwargsrepr=repr(_about(job)),
                )
        wake(client, lanes)
    return len(jobs)


def _about(job: Sendable) -> dict[str, Any]:
    """What Flower shows of a job: model, prompt head, ``max_new_tokens``, tenant."""
    about: dict[str, Any] = {"model": job.model}
    prompt: str | None = getattr(job, "summary", None)
    if prompt is not None:
        params: dict[str, Any] = getattr(job, "params", None) or {}
        about["prompt"] = prompt[:60]
        about["max_new_tokens"] = params.get("max_new_tokens")
    if tenant := getattr(job, "tenant", None):
        about["tenant"] = tenant
    return about


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
        # Enough prefetch for the flush running plus the next one forming, and a group of
        # interactive calls past them (the dispatcher holds batch work to the first two).
        worker_prefetch_multiplier=most_held(settings),
        # Task events, so Flower shows every job: received, started, succeeded or
        # failed by the worker (workers/events.py), and optionally sent by the
        # producer, so Flower lists queued jobs too, those for a model no worker
        # serves included (one more pipelined publish per job: submit_many takes
        # about 1.4x as long).
        worker_send_task_events=True,
        task_send_sent_event=settings.task_sent_events,
        task_default_queue=queue_name(settings.model),
    )
    return app

"""``cq worker``: run one worker process serving one model from its queue."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from completion_queue import Settings, default_nodename, queue_name, resolve_broker_url
from engine.auto import pick_engine
from workers.app import create_worker_app

log = logging.getLogger(__name__)


def resolve_engine(settings: Settings) -> Settings:
    """Return ``settings`` with ``CQ_ENGINE=auto`` made the engine it picks here.

    The pick and its reason are logged once Celery has set up the worker's logging, so
    the line reaches the worker's log; the worker describes itself with the engine picked.
    """
    if settings.engine != "auto":
        return settings
    engine, why = pick_engine()

    def say(**_: Any) -> None:
        log.info("CQ_ENGINE=auto runs the %s engine: %s", engine, why)

    signals.celeryd_after_setup.connect(say, weak=False)
    return settings.model_copy(update={"engine": engine})


def run_worker(settings: Settings, *, hostname: str | None = None) -> None:
    """Run a worker in the foreground until it is stopped (SIGTERM: warm shutdown)."""
    settings = resolve_engine(settings)
    broker_url = resolve_broker_url(settings)
    app = create_worker_app(settings, broker_url)
    nodename = hostname or default_nodename(os.getpid(), settings.model)
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={queue_name(settings.model)}",
            f"--hostname={nodename}",
            f"--loglevel={settings.log_level}",
            "--without-mingle",
            "--without-gossip",
        ]
    )


def main() -> None:
    """Entry point of ``python -m workers``: settings from ``CQ_*`` only."""
    run_worker(Settings())

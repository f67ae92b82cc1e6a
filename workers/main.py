"""``cq worker``: run one worker process serving one model from its queue."""

from __future__ import annotations

import os

from completion_queue import Settings, default_nodename, queue_name, resolve_broker_url
from workers.app import create_worker_app


def run_worker(settings: Settings, *, hostname: str | None = None) -> None:
    """Run a worker in the foreground until it is stopped (SIGTERM: warm shutdown)."""
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

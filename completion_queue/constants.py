"""Names that producers and workers must agree on: tasks, queues, files."""

from __future__ import annotations

import re

#: The one Celery task every job runs through; its id is the job id.
TASK_GENERATE = "cq.generate"

#: Prefix of the per-model queue names (one queue per model).
QUEUE_PREFIX = "cq.model."

#: The default model: a tiny GPT-2-style model the project builds locally.
TINY_MODEL_NAME = "tiny-gpt2"

#: Data directory for the embedded defaults (SQLite file, Redis data, models).
DEFAULT_DATA_DIR = ".cq"

#: Logged by a worker's pool process once its model is loaded and warmed up.
WORKER_READY_LINE = "cq worker ready"

#: Logged by a worker's main process once it consumes its queue.
WORKER_CONSUMING_LINE = "cq worker consuming"

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@-]")


def queue_name(model: str) -> str:
    """Return the Redis queue that carries jobs for ``model``."""
    return QUEUE_PREFIX + _UNSAFE.sub("_", model)

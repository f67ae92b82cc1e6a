"""Names that producers and workers must agree on: tasks, queues, files."""

from __future__ import annotations

import hashlib
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
    """Return the Redis queue that carries jobs for ``model``: one queue per model name.

    A name of safe characters is used as it is (``cq.model.gpt2``). Any other
    character becomes ``_``, and a hash of the whole name follows a ``#``, which
    no safe name contains: so "a b" and "a_b" never share a queue
    (``cq.model.a_b#…`` and ``cq.model.a_b``).
    """
    safe = _UNSAFE.sub("_", model)
    if safe == model:
        return QUEUE_PREFIX + model
    digest = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{QUEUE_PREFIX}{safe}#{digest}"


#: Prefix of each streamed job's Redis stream of text deltas (see :func:`events_key`).
EVENTS_PREFIX = "cq.events."

#: How long a job's event stream outlives its last write, in seconds.
EVENTS_TTL_S = 3600

#: Most entries kept in one job's event stream (approximate trim).
EVENTS_MAXLEN = 100_000


def events_key(job_id: object) -> str:
    """Return the Redis stream that carries ``job_id``'s text deltas and its end."""
    return f"{EVENTS_PREFIX}{job_id}"

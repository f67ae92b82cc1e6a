"""Start edge for the plain Celery form: ``celery -A workers.serve worker``.

Settings are read from ``CQ_*`` here, once, because this module is the edge.
"""

from __future__ import annotations

from completion_queue import Settings
from workers.app import create_worker_app
from workers.main import resolve_engine

app = create_worker_app(resolve_engine(Settings()))

"""Start edge for Flower: ``celery --app completion_queue.flower_app flower``.

A light app (no torch, no model): Flower only needs the broker and the shared
configuration. Settings are read from ``CQ_*`` here, once, because this module
is the edge; ``cq flower`` runs it.
"""

from __future__ import annotations

from completion_queue.celery_app import create_app
from completion_queue.settings import Settings

app = create_app(Settings())

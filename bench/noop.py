"""The baseline for per-job cost: a bare Celery no-op task on the same Redis and worker settings.

Start edge for ``celery -A bench.noop worker``; settings come from ``CQ_*`` here.
"""

from __future__ import annotations

from typing import Any

import redis

from bench.pipeline import COUNTER_KEY, NOOP_TASK
from completion_queue import Settings, create_app

_settings = Settings()
app = create_app(_settings)
_redis: Any = None


@app.task(name=NOOP_TASK, acks_late=True, ignore_result=True)
def noop() -> None:
    """Count one finished task, the cheapest observable completion."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    _redis.incr(COUNTER_KEY)

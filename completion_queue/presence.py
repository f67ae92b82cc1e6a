"""Which workers are alive and which model each serves, in one Redis hash.

Celery keeps no registry of its workers: ``inspect`` broadcasts a question and
waits out its whole timeout (a second), because it cannot know how many
workers will answer. A warning on every `cq submit`, and an API that answers
404 at once for a model nobody serves, need the answer in one round trip.

So each worker's main process writes ``{"model": …, "until": …}`` under its
node name in the hash ``cq.workers`` when it starts consuming and at each
heartbeat, and deletes it on a warm shutdown. ``until`` is three heartbeats
ahead on Redis's own clock (``TIME``), so a worker killed without a word drops
out within three heartbeats, and hosts need no synchronised clocks. Readers
ignore entries past their ``until`` and delete those an hour past it.
"""

from __future__ import annotations

import json
from typing import Any

#: The hash of live workers: node name -> JSON ``{"model", "until"}``.
WORKERS_KEY = "cq.workers"

#: A worker counts as alive for this many heartbeats after its last one.
BEATS_ALIVE = 3

#: An entry this long past its ``until`` is deleted by the next reader.
FORGET_AFTER_S = 3600


def _seconds(reply: tuple[Any, Any]) -> float:
    """Seconds since the epoch from a Redis ``TIME`` reply (seconds, microseconds)."""
    seconds, micros = reply
    return float(seconds) + float(micros) / 1e6


def announce(client: Any, hostname: str, model: str, *, heartbeat_s: float) -> None:
    """Record that ``hostname`` serves ``model`` for the next ``BEATS_ALIVE`` heartbeats."""
    until = _seconds(client.time()) + BEATS_ALIVE * heartbeat_s
    client.hset(WORKERS_KEY, hostname, json.dumps({"model": model, "until": until}))


def withdraw(client: Any, hostname: str) -> None:
    """Forget ``hostname`` (it stops consuming)."""
    client.hdel(WORKERS_KEY, hostname)


def served_models(client: Any) -> dict[str, int]:
    """Return the models that live workers serve, with how many workers serve each."""
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hgetall(WORKERS_KEY)
        reply, entries = pipe.execute()
    now = _seconds(reply)
    served: dict[str, int] = {}
    forgotten = []
    for hostname, raw in entries.items():
        try:
            entry = json.loads(raw)
            model, until = str(entry["model"]), float(entry["until"])
        except (ValueError, KeyError, TypeError):
            forgotten.append(hostname)
            continue
        if until >= now:
            served[model] = served.get(model, 0) + 1
        elif until < now - FORGET_AFTER_S:
            forgotten.append(hostname)
    if forgotten:
        client.hdel(WORKERS_KEY, *forgotten)
    return served

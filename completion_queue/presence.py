"""Which workers are alive and which model each serves, in one Redis hash.

Celery keeps no registry of its workers: ``inspect`` broadcasts a question and
waits out its whole timeout (a second), because it cannot know how many
workers will answer. A warning on every `cq submit`, and an API that answers
404 at once for a model nobody serves, need the answer in one round trip.

So each worker's main process writes ``{"model": …, "until": …, "chat": …}``
under its node name in the hash ``cq.workers`` when it starts consuming and at each
heartbeat, and deletes it on a warm shutdown. ``until`` is three heartbeats
ahead on Redis's own clock (``TIME``), so a worker killed without a word drops
out within three heartbeats, and hosts need no synchronised clocks. Readers
ignore entries past their ``until`` and delete those an hour past it. ``chat``
says whether the model's tokenizer has a chat template (absent until the model
is loaded), so the API refuses messages for a model that cannot take them at
once, instead of failing the job later.
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


def announce(
    client: Any, hostname: str, model: str, *, heartbeat_s: float, chat: bool | None = None
) -> None:
    """Record that ``hostname`` serves ``model`` for the next ``BEATS_ALIVE`` heartbeats
    (and whether it takes chat messages, once known)."""
    until = _seconds(client.time()) + BEATS_ALIVE * heartbeat_s
    entry: dict[str, Any] = {"model": model, "until": until}
    if chat is not None:
        entry["chat"] = chat
    client.hset(WORKERS_KEY, hostname, json.dumps(entry))


def withdraw(client: Any, hostname: str) -> None:
    """Forget ``hostname`` (it stops consuming)."""
    client.hdel(WORKERS_KEY, hostname)


def served_models(client: Any) -> dict[str, int]:
    """Return the models that live workers serve, with how many workers serve each."""
    served: dict[str, int] = {}
    for entry in live_workers(client):
        served[entry["model"]] = served.get(entry["model"], 0) + 1
    return served


def models_without_chat(client: Any) -> set[str]:
    """Return the served models whose every live worker said its tokenizer has no chat
    template."""
    chat: dict[str, bool] = {}
    for entry in live_workers(client):
        chat[entry["model"]] = chat.get(entry["model"], False) or entry.get("chat") is not False
    return {model for model, takes_chat in chat.items() if not takes_chat}


def live_workers(client: Any) -> list[dict[str, Any]]:
    """Return the entries of live workers (``model``, ``until``, maybe ``chat``)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hgetall(WORKERS_KEY)
        reply, entries = pipe.execute()
    now = _seconds(reply)
    live: list[dict[str, Any]] = []
    forgotten = []
    for hostname, raw in entries.items():
        try:
            entry = json.loads(raw)
            entry["model"], entry["until"] = str(entry["model"]), float(entry["until"])
        except (ValueError, KeyError, TypeError):
            forgotten.append(hostname)
            continue
        if entry["until"] >= now:
            live.append(entry)
        elif entry["until"] < now - FORGET_AFTER_S:
            forgotten.append(hostname)
    if forgotten:
        client.hdel(WORKERS_KEY, *forgotten)
    return live

"""Health checks: the process is up (``/healthz``); its database and broker answer (``/readyz``)."""

from __future__ import annotations

import contextlib

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.state import APIState, State
from completion_queue import redact_url

router = APIRouter(tags=["health"])

#: How long /readyz waits for the database and the broker.
READY_TIMEOUT_S = 2.0


def _ready(state: APIState) -> dict[str, str]:
    problems: dict[str, str] = {}
    try:
        with state.client.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        problems["database"] = f"{type(exc).__name__}: {redact_url(str(exc))[:200]}"
    try:
        broker = redis.Redis.from_url(
            state.client.app.conf.broker_url,
            socket_connect_timeout=READY_TIMEOUT_S,
            socket_timeout=READY_TIMEOUT_S,
        )
        with contextlib.closing(broker):
            broker.ping()
    except Exception as exc:
        problems["broker"] = f"{type(exc).__name__}: {redact_url(str(exc))[:200]}"
    return problems


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
def readyz(state: State) -> JSONResponse:
    """The database and the broker are reachable."""
    problems = _ready(state)
    if problems:
        return JSONResponse({"status": "unavailable", **problems}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok", "broker": "ok"})

"""Health checks: the process is up (``/healthz``); its database and broker answer (``/readyz``)."""

from __future__ import annotations

import contextlib
import logging

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.state import APIState, State
from completion_queue import redact_url

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

#: How long /readyz waits for the database and the broker.
READY_TIMEOUT_S = 2.0


def _ready(state: APIState) -> dict[str, bool]:
    """Whether the database and the broker answer; why one does not goes to the log only."""
    ready = {"database": True, "broker": True}
    try:
        with state.client.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        ready["database"] = False
        log.warning("not ready: database: %s: %s", type(exc).__name__, redact_url(str(exc)))
    try:
        broker = redis.Redis.from_url(
            state.client.app.conf.broker_url,
            socket_connect_timeout=READY_TIMEOUT_S,
            socket_timeout=READY_TIMEOUT_S,
        )
        with contextlib.closing(broker):
            broker.ping()
    except Exception as exc:
        ready["broker"] = False
        log.warning("not ready: broker: %s: %s", type(exc).__name__, redact_url(str(exc)))
    return ready


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (answered on the event loop: no thread, however busy the pool)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
def readyz(state: State) -> JSONResponse:
    """The database and the broker are reachable: which is not, without why (that is logged)."""
    ready = _ready(state)
    if all(ready.values()):
        return JSONResponse({"status": "ok", **ready})
    return JSONResponse({"status": "unavailable", **ready}, status_code=503)

"""The HTTP API (FastAPI): native async jobs, OpenAI-compatible completions and batches.

Built at the edge by :func:`create_api` from one :class:`Settings`; it reads and
writes through the same :class:`CompletionClient` and database as the Python
client, so validation, limits and job rows are the same whichever way a job came.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text

from completion_queue.settings import Settings, redact_url
from producer.api_errors import APIError, error_response, install_error_handlers
from producer.client import CompletionClient
from producer.views import ErrorInfo
from producer.webhooks import WebhookDispatcher

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How long /readyz waits for the database and the broker.
READY_TIMEOUT_S = 2.0


@dataclass
class APIState:
    """What the routes share: the settings, the client and the webhook dispatcher."""

    settings: Settings
    client: CompletionClient
    dispatcher: WebhookDispatcher | None


def api_state(request: Request) -> APIState:
    """Return the state of the app serving ``request`` (a FastAPI dependency)."""
    state: APIState = request.app.state.cq
    return state


State = Annotated[APIState, Depends(api_state)]

_bearer = HTTPBearer(auto_error=False, description="An API key from CQ_API_KEYS.")


def require_api_key(
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse a request without a configured bearer key (no keys configured: open)."""
    keys = state.settings.api_keys
    if not keys:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not any(hmac.compare_digest(given, key.encode()) for key in keys):
        raise APIError(
            ErrorInfo(401, "missing or invalid API key", code="invalid_api_key"),
            headers={"WWW-Authenticate": "Bearer"},
        )


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app reads it all."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ErrorInfo(
            413, f"request body must be at most {self.max_bytes} bytes", code="body_too_large"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(too_large)
            return message

        await self.app(scope, limited, send)


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


def create_api(settings: Settings, *, client: CompletionClient | None = None) -> FastAPI:
    """Return the API app on ``settings`` (the client is built from them when omitted)."""
    from producer.batches import router as batches_router
    from producer.jobs_api import router as jobs_router
    from producer.openai_api import router as openai_router

    cq_client = client or CompletionClient(settings=settings)
    dispatcher = None
    if settings.webhook_secret:
        dispatcher = WebhookDispatcher(settings, cq_client.sessions)
    state = APIState(settings=settings, client=cq_client, dispatcher=dispatcher)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if dispatcher is not None:
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            if client is None:
                cq_client.close()

    app = FastAPI(
        title="completion-queue",
        summary="Queue text-completion jobs for GPU workers; results land in SQL.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.cq = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Not ready"}})
    def readyz(state: State) -> JSONResponse:
        """The database and the broker are reachable."""
        problems = _ready(state)
        if problems:
            return JSONResponse({"status": "unavailable", **problems}, status_code=503)
        return JSONResponse({"status": "ok", "database": "ok", "broker": "ok"})

    auth = [Depends(require_api_key)]
    for router in (jobs_router, openai_router, batches_router):
        app.include_router(router, dependencies=auth)
    return app

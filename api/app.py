"""The HTTP API (FastAPI): native async jobs, OpenAI-compatible completions and batches.

Built at the edge by :func:`create_api` from one :class:`Settings`; it reads and
writes through the same :class:`CompletionClient` and database as the Python
client, so validation, limits and job rows are the same whichever way a job came.

The docs pages (``/docs``, ``/redoc``) load their JavaScript, CSS and favicon
from this process, under ``/static-offline-docs``, never from a CDN: GPU clusters
are often air-gapped, where a CDN-backed page is blank. The assets come from
``fastapi-offline``: kept (its bundled Swagger UI 5 and ReDoc 2 are refreshed with
its releases), it is FastAPI's own self-hosting recipe packaged, and it is the
one candidate shipping both pages and the favicon (``swagger-ui-bundle`` and
``swagger-ui-py`` ship Swagger UI only). Docs, assets and ``/openapi.json`` sit
outside the ``/v1`` routers, so they need no key, like ``/healthz``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from api.errors import APIError, error_response, install_error_handlers
from api.routes import (
    batches,
    chat,
    completions,
    files,
    health,
    jobs,
    models,
    operator,
    responses,
    usage,
)
from api.state import APIState, caller
from api.views import ErrorInfo
from api.webhooks import WebhookDispatcher
from completion_queue import Settings
from producer import CompletionClient

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def create_api(settings: Settings, *, client: CompletionClient | None = None) -> FastAPI:
    """Return the API app on ``settings`` (the client is built from them when omitted)."""
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

    app = FastAPIOffline(
        title="completion-queue",
        summary="Queue text-completion jobs for GPU workers; results land in SQL.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.cq = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)

    app.include_router(health.router)
    app.include_router(operator.router)
    auth = [Depends(caller)]
    for resource in (jobs, completions, chat, models, files, batches, usage):
        app.include_router(resource.router, dependencies=auth)
    app.include_router(responses.router, dependencies=auth)
    return app

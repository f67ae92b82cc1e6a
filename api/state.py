"""What the routes share: the app's state, and the dependencies that read it (auth)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import APIError
from api.views import ErrorInfo
from api.webhooks import WebhookDispatcher
from completion_queue import Settings
from producer import CompletionClient


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

"""What the routes share: the app's state, and who is calling (auth: keys are tenants).

Every ``/v1`` route takes a :class:`Caller`: the tenant whose key came with the
request, and the client scoped to it (it sees and submits that tenant's jobs
only). Keys come from the database (``cq keys create``) and from ``CQ_API_KEYS``
(``name:key`` or a bare key, each its own tenant), and are checked on every
request, so a revoked key is refused on the next one. With no key anywhere, the
API answers loopback peers only, without auth, as the operator's own tool.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import APIError
from api.views import ErrorInfo
from api.webhooks import WebhookDispatcher
from completion_queue import Settings, is_loopback, redact_url
from db import Tenant, has_live_tenants, hash_key, tenant_by_key
from producer import CompletionClient

log = logging.getLogger(__name__)


def env_tenants(keys: list[str]) -> dict[str, Tenant]:
    """The tenants of ``CQ_API_KEYS`` by key hash: ``name:key``, or a key named by its hash."""
    tenants = {}
    for entry in keys:
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = f"key-{hash_key(entry)[:8]}", entry
        tenants[hash_key(key)] = Tenant(name=name)
    return tenants


@dataclass
class APIState:
    """What the routes share: the settings, the client and the webhook dispatcher."""

    settings: Settings
    client: CompletionClient
    dispatcher: WebhookDispatcher | None
    env_keys: dict[str, Tenant] = field(init=False)
    #: ``/v1/completions`` calls waiting now, by tenant name ("" without one).
    waiting: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.env_keys = env_tenants(self.settings.api_keys)

    @contextlib.contextmanager
    def wait_slot(self, tenant: str | None) -> Iterator[None]:
        """Hold one of the tenant's ``CQ_API_MAX_WAITS_PER_TENANT`` waits; 429 when none is free.

        Used from the event loop only: taking and giving back a slot never awaits.
        """
        name, most = tenant or "", self.settings.api_max_waits_per_tenant
        if self.waiting[name] >= most:
            raise APIError(
                ErrorInfo(
                    429,
                    f"{most} completions of this key are waiting already "
                    "(CQ_API_MAX_WAITS_PER_TENANT): retry later, or use POST /v1/jobs",
                    "rate_limit_error",
                    code="too_many_waits",
                ),
                headers={"Retry-After": "1"},
            )
        self.waiting[name] += 1
        try:
            yield
        finally:
            self.waiting[name] -= 1

    def tenant_for(self, key: str) -> Tenant | None:
        """The live tenant whose key is ``key``, or None."""
        # Looked up by hash: timing says something of the hash, nothing of the key.
        tenant = self.env_keys.get(hash_key(key))
        if tenant is not None:
            return tenant
        with self.client.sessions.begin() as session:
            return tenant_by_key(session, key=key)

    def wait_for_rate(self, tenant: Tenant) -> float:
        """Seconds until ``tenant`` may call again, or 0 within its rate (counts this call).

        A fixed window in Redis, shared by every API process: ``rate`` calls per
        second, or one call per ``1/rate`` seconds for rates under one. Without
        the broker, nothing is limited (reads go on; submits fail on their own).
        """
        if not tenant.rate:
            return 0.0
        window = max(1.0, 1.0 / tenant.rate)
        allowed = max(1, int(tenant.rate * window))
        now = time.time()
        slot = int(now // window)
        key = f"cq.rate.{tenant.name}.{slot}"
        try:
            with self.client.app.pool.acquire(block=True, timeout=2) as connection:
                redis = connection.default_channel.client
                count, _ = redis.pipeline().incr(key).expire(key, math.ceil(window) + 1).execute()
        except Exception as exc:  # the broker is down: limit nothing, say so once in a while
            log.warning("rate limit of %s not checked: %s", tenant.name, redact_url(str(exc)))
            return 0.0
        return (slot + 1) * window - now if count > allowed else 0.0

    def keys_exist(self) -> bool:
        """True when any key is live, in ``CQ_API_KEYS`` or in the database."""
        if self.env_keys:
            return True
        with self.client.sessions() as session:
            return has_live_tenants(session)


def api_state(request: Request) -> APIState:
    """Return the state of the app serving ``request`` (a FastAPI dependency)."""
    state: APIState = request.app.state.cq
    return state


State = Annotated[APIState, Depends(api_state)]

_bearer = HTTPBearer(
    auto_error=False, description="An API key: from `cq keys create`, or one in CQ_API_KEYS."
)


@dataclass(frozen=True)
class Caller:
    """Who is calling: a tenant, or None when no key exists (a loopback peer)."""

    tenant: Tenant | None
    #: The client scoped to the tenant: what it submits is theirs, it sees only theirs.
    client: CompletionClient

    @property
    def name(self) -> str | None:
        """The tenant's name; None for the operator (no keys exist)."""
        return self.tenant.name if self.tenant else None


def caller(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The tenant whose key came with the request; 401 without a live key."""
    if credentials is not None:
        tenant = state.tenant_for(credentials.credentials)
        if tenant is not None:
            wait_s = state.wait_for_rate(tenant)
            if wait_s:
                raise APIError(
                    ErrorInfo(
                        429,
                        f"tenant {tenant.name} may make {tenant.rate:g} requests per second "
                        "(its --rate): retry later",
                        "rate_limit_error",
                        code="rate_limit_exceeded",
                    ),
                    headers={"Retry-After": str(math.ceil(wait_s))},
                )
            return Caller(tenant, state.client.as_tenant(tenant))
    if not state.keys_exist():
        # Whatever bearer came (the openai clients always send one, e.g. api_key="EMPTY"),
        # with no key anywhere a loopback peer is served without auth.
        peer = request.client.host if request.client else ""
        if is_loopback(peer):
            return Caller(None, state.client)
        raise unauthorized(
            "this API has no keys yet, so it answers loopback only: "
            "create one with `cq keys create NAME`"
        )
    raise unauthorized("missing or invalid API key")


def unauthorized(message: str) -> APIError:
    """A 401 asking for a bearer key."""
    return APIError(
        ErrorInfo(401, message, code="invalid_api_key"), headers={"WWW-Authenticate": "Bearer"}
    )


CallerDep = Annotated[Caller, Depends(caller)]


def operator(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let the operator through (``/backlog``, ``/metrics``): a loopback peer, or a key of
    ``CQ_OPERATOR_KEYS``. Tenant keys are refused: these routes show every tenant's load."""
    if is_loopback(request.client.host if request.client else ""):
        return
    if credentials is not None:
        given = hash_key(credentials.credentials)
        if any(hmac.compare_digest(given, hash_key(key)) for key in state.settings.operator_keys):
            return
    raise unauthorized("this route answers loopback peers, or an operator key (CQ_OPERATOR_KEYS)")

"""``GET /v1/models`` and ``GET /v1/models/{model}``: the models that live workers serve now."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.openai import not_served
from api.state import Caller, CallerDep

router = APIRouter(prefix="/v1", tags=["openai"])


def _served(caller: Caller) -> dict[str, int]:
    """Live workers per model (as they announce themselves in Redis at each heartbeat), of
    the models the caller may use."""
    served = caller.client.served_models()
    allowed = caller.tenant.models if caller.tenant else None
    if allowed is not None:
        served = {model: n for model, n in served.items() if model in allowed}
    return served


def _model(model: str, workers: int, now: int) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": now,
        "owned_by": "completion-queue",
        "workers": workers,
    }


@router.get("/models")
def list_models(caller: CallerDep) -> dict[str, Any]:
    """The models that live workers serve now, of those the caller may use."""
    now = int(time.time())
    served = _served(caller)
    return {"object": "list", "data": [_model(m, n, now) for m, n in sorted(served.items())]}


@router.get("/models/{model:path}")
def retrieve_model(model: str, caller: CallerDep) -> dict[str, Any]:
    """One model that live workers serve now (a Hugging Face id may hold a ``/``); 404
    ``model_not_found`` if none does, or the caller may not use it."""
    served = _served(caller)
    if model not in served:
        raise not_served(model, served)
    return _model(model, served[model], int(time.time()))

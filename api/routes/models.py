"""``GET /v1/models``: the models that live workers serve now."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.state import CallerDep

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
def list_models(caller: CallerDep) -> dict[str, Any]:
    """The models that live workers serve now (as they announce themselves in Redis at each
    heartbeat), of those the caller may use."""
    now = int(time.time())
    served = caller.client.served_models()
    allowed = caller.tenant.models if caller.tenant else None
    if allowed is not None:
        served = {model: n for model, n in served.items() if model in allowed}
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": now, "owned_by": "completion-queue",
             "workers": workers}
            for model, workers in sorted(served.items())
        ],
    }  # fmt: skip

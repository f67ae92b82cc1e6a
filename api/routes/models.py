"""``GET /v1/models``: the models that live workers serve now."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.state import State
from producer.stats import live_models

router = APIRouter(prefix="/v1", tags=["openai"])

#: How long GET /v1/models waits for live workers to answer.
INSPECT_TIMEOUT_S = 1.0


@router.get("/models")
def list_models(state: State) -> dict[str, Any]:
    """The models that live workers serve now (asked over the broker, ~1 s)."""
    now = int(time.time())
    served = live_models(state.client.app, timeout_s=INSPECT_TIMEOUT_S)
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": now, "owned_by": "completion-queue",
             "workers": workers}
            for model, workers in sorted(served.items())
        ],
    }  # fmt: skip

"""Reading request bodies the way every route does: JSON, or a 422 that says why not; and
the OpenAPI description of such a body."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from api.errors import APIError
from api.views import ErrorInfo


async def read_json(request: Request) -> Any:
    """Return the request's JSON body; a body that is not JSON gets 422."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(
            ErrorInfo(422, f"request body must be JSON: {exc}", code="invalid_json")
        ) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """Return a route's ``openapi_extra`` documenting the body :func:`read_json` reads as
    ``model``'s JSON schema (the route validates it itself, so FastAPI does not)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

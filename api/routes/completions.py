"""``POST /v1/completions``: OpenAI's legacy completions, answered once the jobs finish, or
streamed as Server-Sent Events (``stream: true``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.completion_call import answer_completion
from api.requests import json_body
from api.shapes import TEXT_COMPLETION
from api.state import CallerDep, State
from api.streaming import EventStream

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions", response_model=None, openapi_extra=json_body(TEXT_COMPLETION.body))
async def create_completion(
    request: Request, state: State, caller: CallerDep
) -> dict[str, Any] | EventStream:
    """Queue the prompts, wait for the jobs, answer in OpenAI's ``text_completion`` shape
    (with ``stream: true``: its chunks as Server-Sent Events, as the jobs generate)."""
    return await answer_completion(request, state, caller, TEXT_COMPLETION)

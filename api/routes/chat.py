"""``POST /v1/chat/completions``: OpenAI's chat completions, answered once the job finishes, or
streamed as Server-Sent Events (``stream: true``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.completion_call import answer_completion
from api.requests import json_body
from api.shapes import CHAT_COMPLETION
from api.state import CallerDep, State
from api.streaming import EventStream

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/chat/completions", response_model=None, openapi_extra=json_body(CHAT_COMPLETION.body)
)
async def create_chat_completion(
    request: Request, state: State, caller: CallerDep
) -> dict[str, Any] | EventStream:
    """Queue the conversation as one job, wait for it, answer as a ``chat.completion``
    (with ``stream: true``: ``chat.completion.chunk``s as Server-Sent Events, as it generates)."""
    return await answer_completion(request, state, caller, CHAT_COMPLETION)

"""``POST /v1/chat/completions``: OpenAI's chat completions, answered once the job finishes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from api.chat import ChatBody, chat_request, check_chat_template
from api.errors import APIError
from api.openai import check_served, finished_completion, submit_completions
from api.requests import read_json
from api.state import CallerDep, State
from api.views import chat_view, job_failure

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/chat/completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatBody.model_json_schema()}},
        }
    },
)
async def create_chat_completion(
    request: Request, state: State, caller: CallerDep
) -> dict[str, Any]:
    """Queue the conversation as one job, wait for it, answer as a ``chat.completion``."""
    body = await read_json(request)
    client = caller.client
    chat = chat_request(body)
    await run_in_threadpool(check_served, client, [chat])
    await run_in_threadpool(check_chat_template, client, chat)
    with state.wait_slot(caller.name):
        jobs = await run_in_threadpool(submit_completions, client, [chat])
        if body.get("user") is not None or body.get("metadata"):
            log.info(
                "chat completion for user %r (metadata %r): job %s",
                body.get("user"), body.get("metadata"), jobs[0].id,
            )  # fmt: skip
        jobs = await finished_completion(client, jobs, state.settings.api_wait_timeout_s)
    failure = job_failure(jobs[0])
    if failure is not None:
        raise APIError(failure)
    return chat_view(jobs[0], model=jobs[0].model)

"""``POST /v1/chat/completions``: OpenAI's chat completions, answered once the job finishes, or
streamed as Server-Sent Events (``stream: true``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from api.chat import ChatBody, chat_request, check_chat_template
from api.errors import APIError
from api.openai import check_served, finished_completion, stream_usage, submit_completions
from api.requests import read_json
from api.state import CallerDep, State
from api.streaming import EventStream, chat_chunks, start_streamed
from api.views import chat_view, job_failure
from db import Job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/chat/completions",
    response_model=None,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatBody.model_json_schema()}},
        }
    },
)
async def create_chat_completion(
    request: Request, state: State, caller: CallerDep
) -> dict[str, Any] | EventStream:
    """Queue the conversation as one job, wait for it, answer as a ``chat.completion``
    (with ``stream: true``: ``chat.completion.chunk``s as Server-Sent Events, as it generates)."""
    body = await read_json(request)
    client = caller.client
    chat = chat_request(body, streaming=True)
    await run_in_threadpool(check_served, client, [chat])
    await run_in_threadpool(check_chat_template, client, chat)
    include_usage = stream_usage(body)
    if include_usage is not None:
        call = await start_streamed(state, caller, [chat])
        _log_user(body, call.jobs[0])
        return EventStream(chat_chunks(call, include_usage=include_usage), call.close)
    with state.wait_slot(caller.name):
        jobs = await run_in_threadpool(submit_completions, client, [chat])
        _log_user(body, jobs[0])
        jobs = await finished_completion(client, jobs, state.settings.api_wait_timeout_s, request)
    failure = job_failure(jobs[0])
    if failure is not None:
        raise APIError(failure)
    return chat_view(jobs[0], model=jobs[0].model)


def _log_user(body: dict[str, Any], job: Job) -> None:
    if body.get("user") is not None or body.get("metadata"):
        log.info(
            "chat completion for user %r (metadata %r): job %s",
            body.get("user"),
            body.get("metadata"),
            job.id,
        )

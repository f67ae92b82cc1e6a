"""``POST /v1/completions``: OpenAI's legacy completions, answered once the jobs finish, or
streamed as Server-Sent Events (``stream: true``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from api.errors import APIError
from api.openai import (
    CompletionsBody,
    check_served,
    completion_requests,
    finished_completion,
    stream_usage,
    submit_completions,
)
from api.requests import read_json
from api.state import CallerDep, State
from api.streaming import EventStream, completion_chunks, start_streamed
from api.views import completion_view, job_failure
from db import Job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/completions",
    response_model=None,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CompletionsBody.model_json_schema()}},
        }
    },
)
async def create_completion(
    request: Request, state: State, caller: CallerDep
) -> dict[str, Any] | EventStream:
    """Queue the prompts, wait for the jobs, answer in OpenAI's ``text_completion`` shape
    (with ``stream: true``: its chunks as Server-Sent Events, as the jobs generate)."""
    body = await read_json(request)
    client = caller.client
    requests = completion_requests(body, client.settings.max_batch_requests, streaming=True)
    await run_in_threadpool(check_served, client, requests)
    include_usage = stream_usage(body)
    if include_usage is not None:
        call = await start_streamed(state, caller, requests)
        _log_user(body, call.jobs)
        return EventStream(completion_chunks(call, include_usage=include_usage), call.close)
    with state.wait_slot(caller.name):
        jobs = await run_in_threadpool(submit_completions, client, requests)
        _log_user(body, jobs)
        jobs = await finished_completion(client, jobs, state.settings.api_wait_timeout_s, request)
    for job in jobs:
        failure = job_failure(job)
        if failure is not None:
            raise APIError(failure)
    return completion_view(jobs, model=jobs[0].model)


def _log_user(body: Any, jobs: list[Job]) -> None:
    if isinstance(body, Mapping) and body.get("user") is not None:
        log.info("completion for user %r: jobs %s", body["user"], [str(j.id) for j in jobs])

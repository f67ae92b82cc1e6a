"""``POST /v1/completions``: OpenAI's legacy completions, answered once the jobs finish."""

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
    submit_completions,
)
from api.requests import read_json
from api.state import CallerDep, State
from api.views import completion_view, job_failure

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CompletionsBody.model_json_schema()}},
        }
    },
)
async def create_completion(request: Request, state: State, caller: CallerDep) -> dict[str, Any]:
    """Queue the prompts, wait for the jobs, answer in OpenAI's ``text_completion`` shape."""
    body = await read_json(request)
    client = caller.client
    requests = completion_requests(body, client.settings.max_batch_requests)
    await run_in_threadpool(check_served, client, requests)
    with state.wait_slot(caller.name):
        jobs = await run_in_threadpool(submit_completions, client, requests)
        if isinstance(body, Mapping) and body.get("user") is not None:
            log.info("completion for user %r: jobs %s", body["user"], [str(j.id) for j in jobs])
        jobs = await finished_completion(client, jobs, state.settings.api_wait_timeout_s)
    for job in jobs:
        failure = job_failure(job)
        if failure is not None:
            raise APIError(failure)
    return completion_view(jobs, model=jobs[0].model)

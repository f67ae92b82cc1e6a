"""One OpenAI completion call, from its body to its answer: the body of both completion routes.

``POST /v1/completions`` and ``POST /v1/chat/completions`` differ only in their
:class:`~api.shapes.CompletionShape`; the rest is here, once: refuse a bad body or
an unserved model before anything is queued, then queue the jobs and either stream
them (the stream's end, or its client going away, gives back the tenant's wait slot
and cancels the unfinished jobs) or wait for them holding the slot (a client that
goes away, or the wait running out, cancels them) and answer, or map the first
failed job to its error.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.errors import APIError
from api.openai import finished_completion, stream_usage, submit_completions
from api.requests import read_json
from api.shapes import CompletionShape
from api.state import APIState, Caller
from api.streaming import EventStream, openai_chunks, start_streamed
from api.views import job_failure


async def answer_completion(
    request: Request, state: APIState, caller: Caller, shape: CompletionShape
) -> dict[str, Any] | EventStream:
    """Queue the call's jobs and answer them in ``shape``, at once as a stream with
    ``stream: true``, else once they finish.

    Raises:
        CompletionError: the body is invalid, or its model is not served (no job queued).
        APIError: a job failed, the wait ran out (503) or the client went away (499).
    """
    body = await read_json(request)
    client = caller.client
    requests = shape.requests(body, client)
    await run_in_threadpool(shape.check, client, requests)
    include_usage = stream_usage(body)
    if include_usage is not None:
        call = await start_streamed(state, caller, requests)
        shape.log_user(body, call.jobs)
        return EventStream(openai_chunks(call, shape, include_usage=include_usage), call.close)
    with state.wait_slot(caller.name):
        jobs = await run_in_threadpool(submit_completions, client, requests)
        shape.log_user(body, jobs)
        jobs = await finished_completion(client, jobs, state.settings.api_wait_timeout_s, request)
    for job in jobs:
        failure = job_failure(job)
        if failure is not None:
            raise APIError(failure)
    return shape.view(jobs)

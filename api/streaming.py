"""Server-Sent Events: OpenAI's streamed completions, and a native job's deltas and end.

Text comes from :func:`producer.follow_async`: each job's Redis stream, and its
row, which stays the truth at the end. A streamed ``/v1/*completions`` call
answers OpenAI's chunks (``text_completion`` or ``chat.completion.chunk``), then
``data: [DONE]``; a job that fails ends the stream with ``data: {"error": ...}``
in OpenAI's error shape, then ``[DONE]``. A client that goes away before the end
cancels the call's jobs, as vLLM aborts its requests; so does a call whose jobs
show no new text for ``CQ_API_WAIT_TIMEOUT_S``. ``GET /v1/jobs/{id}/events``
only reads: ``event: delta`` per new text, then ``event: end`` with the job.

Every stream says ``: ping - <time>`` (an SSE comment, which OpenAI's clients and any SSE
client skip) every :data:`PING_INTERVAL_S` while it is open, so a call whose job waits in
the queue keeps its connection through a proxy's read timeout (nginx's is 60 s) as long as
that timeout exceeds the interval.

The response is sse-starlette's ``EventSourceResponse``, not FastAPI's (0.135 and later):
FastAPI's sends its pings only around a *path operation* that is itself a generator, with
a module-private interval, so a route that validates the body (answering 400 or 404 as
JSON) and then decides between a JSON answer and a stream cannot have them; sse-starlette's
is a response like any other, returned by the route, with ``ping=`` per response; like
Starlette's ``StreamingResponse`` it watches for the client's disconnect while it waits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.types import Receive, Scope, Send

from api.errors import completion_error_info
from api.openai import submit_completions
from api.shapes import CompletionShape
from api.state import APIState, Caller
from api.views import ErrorInfo, job_failure, job_view, usage
from completion_queue import CompletionError, JobTimeout
from db import Job
from producer import CompletionClient, Delta, Finished, follow_async

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
#: Seconds between a stream's pings: below every common proxy's read timeout (nginx's
#: ``proxy_read_timeout`` 60 s, AWS ALB's idle timeout 60 s, Cloudflare's 100 s).
PING_INTERVAL_S = 15
#: Lines end with ``\n`` alone, in the events and the pings alike.
SEPARATOR = "\n"

# sse-starlette ends every open stream as soon as uvicorn is told to stop; a stream here
# runs to its end instead (its jobs finish, or its idle timeout ends it), as it did before,
# while uvicorn waits for it: the jobs are not cancelled by a restart of the API. (What
# AppStatus.disable_automatic_graceful_drain() does, which is untyped.)
AppStatus.enable_automatic_graceful_drain = False


def sse(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event holding ``data`` as compact JSON."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return ServerSentEvent(text, event=event, sep=SEPARATOR).encode()


class EventStream(EventSourceResponse):
    """A ``text/event-stream`` response that pings while idle and runs ``on_close`` however
    it ends."""

    # For the OpenAPI document, which reads the class (``response_class=EventStream``).
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]] | None = None,
        status_code: int = 200,
    ) -> None:
        # No caching; sse-starlette adds X-Accel-Buffering: no (nginx sends each event on).
        headers = {"Cache-Control": "no-cache"}
        super().__init__(
            events, status_code=status_code, headers=headers, ping=PING_INTERVAL_S, sep=SEPARATOR
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                # Runs even when the client went away and the stream was cancelled.
                with anyio.CancelScope(shield=True):
                    await self.on_close()


@dataclass
class StreamedCall:
    """The jobs of one streamed call, and what it holds until it ends."""

    client: CompletionClient
    jobs: list[Job]
    #: Gives back the tenant's wait slot (``CQ_API_MAX_WAITS_PER_TENANT``).
    release: Callable[[], None]
    idle_timeout_s: float
    finished: set[uuid.UUID] = field(default_factory=set)

    async def close(self) -> None:
        """Give back the wait slot; cancel the jobs the stream did not see finished."""
        self.release()
        for job in self.jobs:
            if job.id in self.finished:
                continue
            try:
                await run_in_threadpool(self.client.cancel, job.id)
            except CompletionError as exc:
                log.warning("could not cancel job %s of a closed stream: %s", job.id, exc)

    async def outcomes(self) -> AsyncIterator[Delta | Finished | ErrorInfo]:
        """The jobs' deltas and ends; an error (a failed job, a timeout) ends them."""
        ids = [job.id for job in self.jobs]
        try:
            events = follow_async(self.client, ids, idle_timeout_s=self.idle_timeout_s)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Finished):
                        self.finished.add(event.job.id)
                        failure = job_failure(event.job)
                        if failure is not None:
                            yield failure
                            return
                    yield event
        except JobTimeout:
            yield ErrorInfo(
                503,
                f"the completion showed no new text within {self.idle_timeout_s:g}s (is a "
                f"worker serving model {self.jobs[0].model!r}?); its jobs were cancelled",
                "server_error",
                code="timeout",
            )
        except CompletionError as exc:
            yield completion_error_info(exc)
        except Exception:
            log.exception("streaming jobs %s failed", ids)
            yield ErrorInfo(500, "internal error", "server_error")


async def start_streamed(
    state: APIState,
    caller: Caller,
    requests: list[dict[str, Any]],
    in_transaction: Callable[[Session, list[Job]], None] | None = None,
) -> StreamedCall:
    """Queue ``requests`` (with ``stream``), holding one of the tenant's wait slots until the
    returned call is closed (see :class:`EventStream`); ``in_transaction`` as in
    :func:`~api.openai.submit_completions`."""
    slot = contextlib.ExitStack()
    slot.enter_context(state.wait_slot(caller.name))
    try:
        jobs = await run_in_threadpool(
            functools.partial(submit_completions, in_transaction=in_transaction),
            caller.client,
            requests,
        )
    except BaseException:
        slot.close()
        raise
    return StreamedCall(caller.client, jobs, slot.close, state.settings.api_wait_timeout_s)


async def openai_chunks(
    call: StreamedCall, shape: CompletionShape, *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The call's chunks in ``shape``: choice ``index`` = prompt's index * ``n`` + choice."""
    head = shape.chunk_head(call.jobs[0])
    offset = {job.id: i * int(job.params.get("n", 1)) for i, job in enumerate(call.jobs)}

    def chunk(choice: dict[str, Any]) -> bytes:
        return sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    for choice in shape.opening(call.jobs):
        yield chunk(choice)
    done: list[Job] = []
    async for outcome in call.outcomes():
        if isinstance(outcome, ErrorInfo):
            yield sse(outcome.body())
            yield DONE
            return
        if isinstance(outcome, Delta):
            yield chunk(shape.delta(offset[outcome.job_id] + outcome.choice, outcome.text))
            continue
        done.append(outcome.job)
        for index, c in enumerate(outcome.job.choices):
            yield chunk(shape.finish(offset[outcome.job.id] + index, c.finish_reason))
    if include_usage:
        # The outcomes end right after the last job's Finished: the usage follows it at once.
        yield sse({**head, "choices": [], "usage": usage(done)})
    yield DONE


async def job_events(client: CompletionClient, job_id: uuid.UUID) -> AsyncIterator[bytes]:
    """A native job's ``delta`` events (``{"choice", "text"}``), then ``end`` with its view."""
    try:
        events = follow_async(client, [job_id])
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Delta):
                    yield sse({"choice": event.choice, "text": event.text}, event="delta")
                else:
                    yield sse(job_view(event.job), event="end")
    except CompletionError as exc:
        yield sse(completion_error_info(exc).body(), event="error")

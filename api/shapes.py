"""What an OpenAI completion endpoint changes in the one route body both share.

``POST /v1/completions`` and ``POST /v1/chat/completions`` validate, submit, wait
or stream, and map errors the same way (see :mod:`api.completion_call`); a
:class:`CompletionShape` holds what differs: how a body becomes job requests,
and how finished jobs or a delta become the endpoint's JSON objects (a
``text_completion``, or a ``chat.completion`` and its ``chat.completion.chunk``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel

from api.chat import ChatBody, chat_request, check_chat_template
from api.openai import CompletionsBody, check_served, completion_requests
from api.views import chat_view, completion_view, response_head, system_fingerprint
from db import Job
from producer import CompletionClient

log = logging.getLogger(__name__)


class CompletionShape(ABC):
    """One OpenAI completion endpoint's requests and JSON objects."""

    #: The parameters the endpoint documents, for its OpenAPI request body.
    body: type[BaseModel]

    @abstractmethod
    def requests(self, body: Any, client: CompletionClient) -> list[dict[str, Any]]:
        """Map a body (``stream`` allowed) to our requests, before anything is queued.

        Raises:
            ValidationError: a parameter is unsupported or malformed (OpenAI's names).
        """

    def check(self, client: CompletionClient, requests: list[dict[str, Any]]) -> None:
        """Refuse at once what no worker would run: a model none serves (blocking: a thread).

        Raises:
            ModelNotAllowed: 404 ``model_not_found``, naming the models served now.
        """
        check_served(client, requests)

    @abstractmethod
    def view(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """Return the succeeded ``jobs`` as the endpoint's answer."""

    @abstractmethod
    def chunk_head(self, job: Job) -> dict[str, Any]:
        """Return the fields each streamed chunk opens with; ``job`` is the call's first."""

    @abstractmethod
    def delta(self, index: int, text: str) -> dict[str, Any]:
        """Return a streamed chunk's choice holding choice ``index``'s new ``text``."""

    @abstractmethod
    def finish(self, index: int, reason: str | None) -> dict[str, Any]:
        """Return a streamed chunk's choice ending choice ``index`` with ``reason``."""

    def opening(self, jobs: Sequence[Job]) -> Iterator[dict[str, Any]]:
        """The choices of the chunks sent before any text: none unless the shape says."""
        return iter(())

    @abstractmethod
    def log_user(self, body: dict[str, Any], jobs: Sequence[Job]) -> None:
        """Write the end user the body names (if any) with its jobs to the API log."""


class TextCompletion(CompletionShape):
    """``POST /v1/completions``: a job per prompt, ``n`` choices each, as ``text_completion``."""

    body = CompletionsBody

    def requests(self, body: Any, client: CompletionClient) -> list[dict[str, Any]]:
        """One request per prompt, at most ``CQ_MAX_BATCH_REQUESTS``."""
        return completion_requests(body, client.settings.max_batch_requests, streaming=True)

    def view(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """The jobs' choices numbered prompt by prompt, and their usage."""
        return completion_view(jobs, model=jobs[0].model)

    def chunk_head(self, job: Job) -> dict[str, Any]:
        """The non-streamed answer's head: streamed chunks are ``text_completion`` too."""
        return response_head(job, "cmpl", "text_completion", model=job.model)

    def delta(self, index: int, text: str) -> dict[str, Any]:
        """``{"text", "index", "logprobs", "finish_reason"}`` with the new text."""
        return self._choice(index, text)

    def finish(self, index: int, reason: str | None) -> dict[str, Any]:
        """The same choice with no text and its finish reason."""
        return self._choice(index, "", reason)

    def log_user(self, body: dict[str, Any], jobs: Sequence[Job]) -> None:
        """Log ``user`` with the ids of the call's jobs."""
        if body.get("user") is not None:
            log.info("completion for user %r: jobs %s", body["user"], [str(j.id) for j in jobs])

    @staticmethod
    def _choice(index: int, text: str, reason: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}


class ChatCompletion(CompletionShape):
    """``POST /v1/chat/completions``: one job, ``n`` choices, as ``chat.completion``."""

    body = ChatBody

    def requests(self, body: Any, client: CompletionClient) -> list[dict[str, Any]]:
        """The conversation as one request."""
        return [chat_request(body, streaming=True)]

    def check(self, client: CompletionClient, requests: list[dict[str, Any]]) -> None:
        """Refuse as every shape does, and messages for a model whose every live worker has
        no chat template."""
        super().check(client, requests)
        check_chat_template(client, requests[0])

    def view(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """The job's choices as assistant messages, and its usage."""
        return chat_view(jobs[0], model=jobs[0].model)

    def chunk_head(self, job: Job) -> dict[str, Any]:
        """A ``chat.completion.chunk`` head, the fingerprint before the choices."""
        head = response_head(job, "chatcmpl", "chat.completion.chunk", model=job.model)
        return {**head, "system_fingerprint": system_fingerprint(job.model)}

    def delta(self, index: int, text: str) -> dict[str, Any]:
        """``{"index", "delta": {"content"}, "logprobs", "finish_reason"}``."""
        return self._choice(index, {"content": text})

    def finish(self, index: int, reason: str | None) -> dict[str, Any]:
        """An empty delta with the finish reason."""
        return self._choice(index, {}, reason)

    def opening(self, jobs: Sequence[Job]) -> Iterator[dict[str, Any]]:
        """The assistant role first, once per choice, as OpenAI streams it."""
        for index in range(int(jobs[0].params.get("n", 1))):
            yield self._choice(index, {"role": "assistant", "content": ""})

    def log_user(self, body: dict[str, Any], jobs: Sequence[Job]) -> None:
        """Log ``user`` and ``metadata`` with the job's id."""
        if body.get("user") is not None or body.get("metadata"):
            log.info(
                "chat completion for user %r (metadata %r): job %s",
                body.get("user"),
                body.get("metadata"),
                jobs[0].id,
            )

    @staticmethod
    def _choice(index: int, delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


TEXT_COMPLETION = TextCompletion()
CHAT_COMPLETION = ChatCompletion()

"""Errors of the HTTP API: every one in OpenAI's shape, none with a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.views import ErrorInfo
from completion_queue import (
    BrokerUnavailable,
    CompletionError,
    ConfigError,
    IdempotencyConflict,
    JobNotFound,
    JobTimeout,
    ModelNotAllowed,
    QueueFull,
    ValidationError,
    redact_url,
)
from producer.schema import describe_errors

log = logging.getLogger(__name__)

#: What a client reads when the broker (or its configuration) fails; the log has why.
UNAVAILABLE = "the queue is unavailable; retry later"


class APIError(Exception):
    """Raised by a route to answer with an error in OpenAI's shape."""

    def __init__(self, info: ErrorInfo, headers: dict[str, str] | None = None) -> None:
        super().__init__(info.message)
        self.info = info
        self.headers = headers


def not_found(what: str, ident: str, *, param: str = "id") -> APIError:
    """Return the 404 for an unknown id (``param``: the field that named it)."""
    return APIError(ErrorInfo(404, f"no {what} with id {ident!r}", param=param, code="not_found"))


def error_response(info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    """Return ``info`` as a JSON response with its status."""
    return JSONResponse(info.body(), status_code=info.status, headers=headers)


def completion_error_info(exc: CompletionError) -> ErrorInfo:
    """Map one of our errors to what the API answers."""
    message = redact_url(str(exc))
    if isinstance(exc, ValidationError):
        return ErrorInfo(400, message, param=exc.field, code="invalid_value")
    if isinstance(exc, JobNotFound):
        return ErrorInfo(404, message, param="id", code="not_found")
    if isinstance(exc, ModelNotAllowed):
        return ErrorInfo(404, message, param=exc.field, code="model_not_found")
    if isinstance(exc, IdempotencyConflict):
        return ErrorInfo(409, message, param=exc.field, code="idempotency_key_reused")
    if isinstance(exc, QueueFull):
        return ErrorInfo(429, message, "rate_limit_error", code="queue_full")
    if isinstance(exc, JobTimeout):
        return ErrorInfo(503, message, "server_error", code="timeout")
    if isinstance(exc, BrokerUnavailable | ConfigError):
        # The detail names the broker's host and port: for the log, not for clients.
        log.error("queue unavailable: %s", message)
        return ErrorInfo(503, UNAVAILABLE, "server_error", code="unavailable")
    log.error("request failed: %s", message)
    return ErrorInfo(500, "internal error", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape; unexpected ones are logged, never shown."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc.info, exc.headers)

    async def completion_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CompletionError)
        return error_response(completion_error_info(exc))

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors: list[Any] = [
            {**e, "loc": tuple(e["loc"][1:]) if len(e["loc"]) > 1 else e["loc"]}
            for e in exc.errors()
        ]
        message, param = describe_errors(errors)
        return error_response(ErrorInfo(422, message, param=param, code="invalid_request"))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        info = ErrorInfo(exc.status_code, str(exc.detail), kind)
        return error_response(info, dict(exc.headers) if exc.headers else None)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ErrorInfo(500, "internal error", "server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(CompletionError, completion_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)

"""The error hierarchy: one base, shallow subtrees, one line each on when it is raised."""

from __future__ import annotations


class CompletionError(Exception):
    """Raised when anything in completion-queue fails; the base of all our errors."""


class ConfigError(CompletionError):
    """Raised when settings or command-line options are invalid or inconsistent."""


class MissingExtra(ConfigError):
    """Raised when a command needs an optional extra of the package that is not installed."""


class BrokerNotRunning(ConfigError):
    """Raised when ``CQ_BROKER_URL`` is unset and no ``cq up`` runs on this data directory."""


class ValidationError(CompletionError, ValueError):
    """Raised when a completion request is invalid; ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IdempotencyConflict(CompletionError):
    """Raised when an idempotency key was used for a different request; nothing was written."""

    field = "idempotency_key"


class ModelNotAllowed(CompletionError):
    """Raised for a model outside a tenant's ``--models``, or one the API knows no worker serves;
    nothing was written."""

    field = "model"


class QueueFull(CompletionError):
    """Raised when CQ_MAX_QUEUED_JOBS jobs are queued already; nothing was written, retry later."""


class JobNotFound(CompletionError, LookupError):
    """Raised when a job id does not exist in the database."""


class JobTimeout(CompletionError, TimeoutError):
    """Raised when waiting for jobs outlasts its timeout."""


class BrokerUnavailable(CompletionError):
    """Raised when the message broker cannot be reached; nothing was queued."""


class ModelError(CompletionError):
    """Raised when generation for a job fails; that job fails alone."""


class ContextLengthExceeded(ModelError):
    """Raised when a prompt plus its new tokens do not fit the model's context."""


class NoChatTemplate(ModelError):
    """Raised when a job gives messages to a model whose tokenizer has no chat template."""


class UnsupportedResponseFormat(ModelError):
    """Raised when a job's ``response_format`` cannot be compiled to a grammar for its model."""


class OutOfMemory(ModelError):
    """Raised when generation runs out of accelerator memory; the batch is split and retried."""


class GenerationTimeout(ModelError):
    """Raised when a job's generation outlasts ``CQ_JOB_TIMEOUT_S``; that job fails alone."""


class AttemptsExceeded(CompletionError):
    """Raised when a job was claimed ``CQ_MAX_ATTEMPTS`` times without finishing."""

    def __init__(self, max_attempts: int) -> None:
        super().__init__(
            f"job was claimed {max_attempts} times (CQ_MAX_ATTEMPTS) without finishing: "
            "its worker was lost each time"
        )


class WrongModel(CompletionError):
    """Raised when a job reaches a worker of another model and no other queue can take it."""

    def __init__(self, job_model: str, served: str) -> None:
        super().__init__(
            f"job asks for model {job_model!r}, but it reached a worker of {served!r} "
            "that cannot send it on to a queue of that model"
        )


class QueueTimeout(CompletionError):
    """Raised when no worker took a queued job within ``CQ_QUEUE_TIMEOUT_S``."""


class DeadlineExceeded(CompletionError):
    """Raised for a job not started by its ``deadline``; it never runs."""


class BatchExpired(DeadlineExceeded):
    """Raised for a batch's job not started within the batch's 24 h completion window."""


class FatalModelError(ModelError):
    """Raised when the model runtime is unusable (e.g. corrupted CUDA context); the worker exits."""


class EmbeddedRedisError(CompletionError):
    """Raised when the embedded redis-server cannot be found or started."""

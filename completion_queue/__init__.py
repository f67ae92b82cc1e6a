"""What producers and workers share: settings, errors, names and the Celery app."""

from completion_queue.errors import (
    AttemptsExceeded,
    BrokerUnavailable,
    CompletionError,
    ConfigError,
    ContextLengthExceeded,
    EmbeddedRedisError,
    FatalModelError,
    GenerationTimeout,
    JobNotFound,
    JobTimeout,
    ModelError,
    OutOfMemory,
    QueueFull,
    QueueTimeout,
    ValidationError,
)
from completion_queue.settings import Settings, redact_url

__all__ = [
    # settings
    "Settings",
    "redact_url",
    # errors
    "AttemptsExceeded",
    "BrokerUnavailable",
    "CompletionError",
    "ConfigError",
    "ContextLengthExceeded",
    "EmbeddedRedisError",
    "FatalModelError",
    "GenerationTimeout",
    "JobNotFound",
    "JobTimeout",
    "ModelError",
    "OutOfMemory",
    "QueueTimeout",
    "QueueFull",
    "ValidationError",
]

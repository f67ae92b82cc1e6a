"""What producers and workers share: settings, errors, names and the Celery app."""

from completion_queue.errors import (
    BrokerUnavailable,
    CompletionError,
    ConfigError,
    ContextLengthExceeded,
    EmbeddedRedisError,
    FatalModelError,
    JobNotFound,
    JobTimeout,
    ModelError,
    QueueFull,
    ValidationError,
)
from completion_queue.settings import Settings, redact_url

__all__ = [
    # settings
    "Settings",
    "redact_url",
    # errors
    "BrokerUnavailable",
    "CompletionError",
    "ConfigError",
    "ContextLengthExceeded",
    "EmbeddedRedisError",
    "FatalModelError",
    "JobNotFound",
    "JobTimeout",
    "ModelError",
    "QueueFull",
    "ValidationError",
]

"""What every side shares: settings, errors, names, the Celery app, local processes, the reaper.

Other packages import from here; the modules below are internal. The start edge
``completion_queue.flower_app`` is not imported here: it reads settings at import.
"""

from completion_queue.celery_app import (
    broker_url_file,
    celery_priority,
    create_app,
    heartbeat_interval_s,
    prefetch_count,
    published_broker_url,
    queue_depth,
    queue_keys,
    resolve_broker_url,
    restore_interval_s,
    send_jobs,
)
from completion_queue.constants import (
    DEFAULT_DATA_DIR,
    EVENTS_MAXLEN,
    EVENTS_PREFIX,
    EVENTS_TTL_S,
    QUEUE_PREFIX,
    TASK_GENERATE,
    TINY_MODEL_NAME,
    WORKER_CONSUMING_LINE,
    WORKER_READY_LINE,
    events_key,
    queue_name,
)
from completion_queue.errors import (
    AttemptsExceeded,
    BatchExpired,
    BrokerNotRunning,
    BrokerUnavailable,
    CompletionError,
    ConfigError,
    ContextLengthExceeded,
    EmbeddedRedisError,
    FatalModelError,
    GenerationTimeout,
    IdempotencyConflict,
    JobNotFound,
    JobTimeout,
    MissingExtra,
    ModelError,
    ModelNotAllowed,
    NoChatTemplate,
    OutOfMemory,
    QueueFull,
    QueueTimeout,
    UnsupportedResponseFormat,
    ValidationError,
    WrongModel,
)
from completion_queue.extras import EXTRAS, missing_modules, require_extra
from completion_queue.flower import check_auth, flower_command, run_flower
from completion_queue.local import (
    Stopped,
    WorkerProcess,
    child_pids,
    default_nodename,
    embedded_broker,
    rss_mb,
    stop_on_signals,
    stop_workers,
    worker_env,
)
from completion_queue.metrics import JobStatusCollector, Metrics, QueueDepthCollector
from completion_queue.presence import announce, models_without_chat, served_models, withdraw
from completion_queue.reaper import ReapReport, reap
from completion_queue.redis_server import EmbeddedRedis, RedisTLS, find_redis_server, free_port
from completion_queue.settings import Settings, is_loopback, redact_url

__all__ = [
    # local processes and presence
    "Stopped",
    "stop_on_signals",
    "stop_workers",
    "announce",
    "models_without_chat",
    "served_models",
    "withdraw",
    # settings
    "Settings",
    "is_loopback",
    "redact_url",
    # errors
    "AttemptsExceeded",
    "WrongModel",
    "BatchExpired",
    "BrokerNotRunning",
    "BrokerUnavailable",
    "CompletionError",
    "ConfigError",
    "ContextLengthExceeded",
    "EmbeddedRedisError",
    "FatalModelError",
    "GenerationTimeout",
    "IdempotencyConflict",
    "JobNotFound",
    "JobTimeout",
    "MissingExtra",
    "ModelError",
    "ModelNotAllowed",
    "NoChatTemplate",
    "OutOfMemory",
    "QueueFull",
    "QueueTimeout",
    "UnsupportedResponseFormat",
    "ValidationError",
    # the optional extras
    "EXTRAS",
    "missing_modules",
    "require_extra",
    # names
    "DEFAULT_DATA_DIR",
    "EVENTS_MAXLEN",
    "EVENTS_PREFIX",
    "EVENTS_TTL_S",
    "QUEUE_PREFIX",
    "TASK_GENERATE",
    "TINY_MODEL_NAME",
    "WORKER_CONSUMING_LINE",
    "WORKER_READY_LINE",
    "events_key",
    "queue_name",
    # the Celery app and its queues
    "broker_url_file",
    "celery_priority",
    "create_app",
    "heartbeat_interval_s",
    "prefetch_count",
    "published_broker_url",
    "queue_depth",
    "queue_keys",
    "resolve_broker_url",
    "restore_interval_s",
    "send_jobs",
    # local processes
    "EmbeddedRedis",
    "RedisTLS",
    "WorkerProcess",
    "child_pids",
    "default_nodename",
    "embedded_broker",
    "find_redis_server",
    "free_port",
    "rss_mb",
    "worker_env",
    # operations
    "JobStatusCollector",
    "Metrics",
    "QueueDepthCollector",
    "ReapReport",
    "check_auth",
    "flower_command",
    "reap",
    "run_flower",
]

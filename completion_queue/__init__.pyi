"""The public names of completion_queue: the stub lazy_loader reads, and type checkers."""

from .celery_app import (
    broker_url_file,
    celery_priority,
    create_app,
    heartbeat_interval_s,
    prefetch_count,
    published_broker_url,
    queue_depth,
    resolve_broker_url,
    restore_interval_s,
    send_jobs,
)
from .constants import (
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
from .deadlines import DEADLINE_ERRORS
from .errors import (
    AttemptsExceeded,
    BatchExpired,
    BrokerNotRunning,
    BrokerUnavailable,
    CompletionError,
    ConfigError,
    ContextLengthExceeded,
    DeadlineExceeded,
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
from .extras import EXTRAS, missing_modules, require_extra
from .fair import FairQueues, job_cost, lane_queue, model_queues, queue_keys, waiting
from .flower import check_auth, flower_command, run_flower
from .local import (
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
from .metrics import JobStatusCollector, Metrics, QueueDepthCollector, TableCollector
from .presence import announce, models_without_chat, served_models, withdraw
from .reaper import ReapReport, reap
from .redis_server import EmbeddedRedis, RedisTLS, find_redis_server, free_port
from .response_format import ResponseFormat, parse_response_format
from .settings import Settings, is_loopback, redact_url

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
    "DeadlineExceeded",
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
    # what a job past its deadline fails with
    "DEADLINE_ERRORS",
    # a job's response_format, as the producer and the engine read it
    "ResponseFormat",
    "parse_response_format",
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
    # fair share across tenants
    "FairQueues",
    "job_cost",
    "lane_queue",
    "model_queues",
    "waiting",
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
    "TableCollector",
    "ReapReport",
    "check_auth",
    "flower_command",
    "reap",
    "run_flower",
]

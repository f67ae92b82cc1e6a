"""What other services use: the client, the request schema and the CLI. Never imports torch."""

from completion_queue import (
    BrokerUnavailable,
    CompletionError,
    JobNotFound,
    JobTimeout,
    ValidationError,
)
from db import Choice, Job, JobStatus
from producer.backlog import (
    ModelBacklog,
    TenantLoad,
    desired_workers,
    model_backlogs,
    tenant_loads,
)
from producer.client import CompletionClient
from producer.schema import MAX_LOGPROBS, CompletionRequest, Limits, validate_request
from producer.stream import Delta, Finished, StreamEvent, follow, follow_async

__all__ = [
    # client
    "CompletionClient",
    # jobs as read back
    "Choice",
    "Job",
    "JobStatus",
    # reading jobs as they generate
    "Delta",
    "Finished",
    "StreamEvent",
    "follow",
    "follow_async",
    # requests
    "MAX_LOGPROBS",
    "CompletionRequest",
    "Limits",
    "validate_request",
    # the backlog signal autoscalers read, and each tenant's load
    "ModelBacklog",
    "TenantLoad",
    "desired_workers",
    "model_backlogs",
    "tenant_loads",
    # errors
    "BrokerUnavailable",
    "CompletionError",
    "JobNotFound",
    "JobTimeout",
    "ValidationError",
]

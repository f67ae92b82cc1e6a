"""The tables, their engine and their state transitions. Imports neither Celery nor torch."""

from db.batches import (
    Batch,
    StoredFile,
    create_batch,
    create_file,
    get_batch,
    get_file,
    get_file_content,
    mark_batch_cancelled,
    new_id,
)
from db.engine import make_engine, make_session_factory
from db.jobs import (
    Choice,
    Job,
    NewJob,
    Outcome,
    cancel_job,
    cancel_jobs,
    claim_jobs,
    count_queued,
    count_unfinished,
    create_jobs,
    delete_jobs,
    finish_jobs,
    get_job,
    get_jobs,
    get_unfinished_jobs,
    job_states,
    list_jobs,
    prune_jobs,
)
from db.migrate import upgrade
from db.models import FINISHED_STATUSES, JobRow, JobStatus, WebhookStatus
from db.stats import FinishedJob, count_by_status, finished_since, queued_models
from db.webhooks import claim_webhook, due_webhooks, record_webhook

__all__ = [
    # rows and snapshots
    "FINISHED_STATUSES",
    "Batch",
    "Choice",
    "Job",
    "JobRow",
    "JobStatus",
    "NewJob",
    "Outcome",
    "StoredFile",
    "WebhookStatus",
    "FinishedJob",
    # engine and schema
    "make_engine",
    "make_session_factory",
    "upgrade",
    # state transitions
    "cancel_job",
    "cancel_jobs",
    "claim_jobs",
    "count_queued",
    "count_unfinished",
    "create_jobs",
    "delete_jobs",
    "finish_jobs",
    "get_job",
    "get_jobs",
    "get_unfinished_jobs",
    "job_states",
    "list_jobs",
    # webhooks
    "claim_webhook",
    "due_webhooks",
    "record_webhook",
    # files and batches
    "create_batch",
    "create_file",
    "get_batch",
    "get_file",
    "get_file_content",
    "mark_batch_cancelled",
    "new_id",
    "prune_jobs",
    # aggregates
    "count_by_status",
    "finished_since",
    "queued_models",
]

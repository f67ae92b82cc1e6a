"""The tables, their engine, the jobs' transitions and reads. Imports neither Celery nor torch.

Other packages import from here; the modules below are internal.
"""

from db.batch_store import (
    BATCH_WINDOW,
    Batch,
    StoredFile,
    create_batch,
    create_file,
    delete_batch,
    delete_file,
    get_batch,
    get_file,
    get_file_content,
    list_batches,
    list_files,
    mark_batch_cancelled,
    new_id,
)
from db.engine import make_engine, make_session_factory
from db.jobs import (
    cancel_job,
    cancel_jobs,
    claim_jobs,
    create_jobs,
    finish_jobs,
    prune_jobs,
    withdraw_jobs,
)
from db.migrate import upgrade
from db.models import (
    FINISHED_STATUSES,
    LANE_BATCH,
    LANE_INTERACTIVE,
    LANES,
    BatchRow,
    FileRow,
    JobRow,
    JobStatus,
    ResponseRow,
    TenantRow,
    WebhookStatus,
)
from db.notify import NOTIFY_CHANNEL, JobNotice, parse_notice, unfinished_ids
from db.progress import Progress, lost_jobs, write_progress
from db.queries import (
    batch_ids_by_prefix,
    count_queued,
    count_unfinished,
    get_job,
    get_jobs,
    get_unfinished_jobs,
    job_ids_by_prefix,
    job_states,
    list_jobs,
)
from db.recovery import (
    DeadlineErrors,
    Requeued,
    expire_queued_jobs,
    fail_attempts,
    fail_past_deadline,
    old_queued_jobs,
    requeue_jobs,
    stuck_jobs,
)
from db.responses import (
    StoredResponse,
    create_response,
    delete_response,
    get_response,
    get_responses,
)
from db.snapshots import (
    Choice,
    Finished,
    Job,
    JobState,
    NewJob,
    Outcome,
    aware,
    error_dict,
    utcnow,
)
from db.stats import FinishedJob, count_by_status, finished_since, queued_models
from db.tenants import (
    KEY_PREFIX,
    Tenant,
    TenantExists,
    Usage,
    create_tenant,
    has_live_tenants,
    hash_key,
    list_tenants,
    lock_queue_bounds,
    new_key,
    revoke_tenant,
    set_tenant_weight,
    tenant_by_key,
    tenant_weights,
    usage,
)
from db.webhooks import claim_webhook, due_webhooks, give_up_webhook, record_webhook

__all__ = [
    # tables
    "BatchRow",
    "FileRow",
    "JobRow",
    "ResponseRow",
    "TenantRow",
    "FINISHED_STATUSES",
    "LANE_BATCH",
    "LANE_INTERACTIVE",
    "LANES",
    "JobStatus",
    "WebhookStatus",
    # snapshots
    "Choice",
    "Finished",
    "Job",
    "JobState",
    "NewJob",
    "Outcome",
    "aware",
    "error_dict",
    "utcnow",
    # engine and schema
    "make_engine",
    "make_session_factory",
    "upgrade",
    # job transitions
    "cancel_job",
    "cancel_jobs",
    "claim_jobs",
    "create_jobs",
    "finish_jobs",
    "prune_jobs",
    "withdraw_jobs",
    # job reads
    "batch_ids_by_prefix",
    "count_queued",
    "count_unfinished",
    "get_job",
    "get_jobs",
    "get_unfinished_jobs",
    "job_ids_by_prefix",
    "job_states",
    "list_jobs",
    # notifications (PostgreSQL)
    "NOTIFY_CHANNEL",
    "JobNotice",
    "parse_notice",
    "unfinished_ids",
    # progress of running jobs
    "Progress",
    "lost_jobs",
    "write_progress",
    # recovery (the reaper's transitions)
    "DeadlineErrors",
    "Requeued",
    "expire_queued_jobs",
    "fail_attempts",
    "fail_past_deadline",
    "old_queued_jobs",
    "requeue_jobs",
    "stuck_jobs",
    # tenants
    "KEY_PREFIX",
    "Tenant",
    "TenantExists",
    "Usage",
    "create_tenant",
    "has_live_tenants",
    "hash_key",
    "list_tenants",
    "lock_queue_bounds",
    "new_key",
    "revoke_tenant",
    "set_tenant_weight",
    "tenant_by_key",
    "tenant_weights",
    "usage",
    # webhooks
    "claim_webhook",
    "due_webhooks",
    "give_up_webhook",
    "record_webhook",
    # files and batches
    "BATCH_WINDOW",
    "Batch",
    "StoredFile",
    "create_batch",
    "create_file",
    "delete_batch",
    "delete_file",
    "get_batch",
    "get_file",
    "get_file_content",
    "list_batches",
    "list_files",
    "mark_batch_cancelled",
    "new_id",
    # responses (OpenAI's Responses API)
    "StoredResponse",
    "create_response",
    "delete_response",
    "get_response",
    "get_responses",
    # aggregates
    "FinishedJob",
    "count_by_status",
    "finished_since",
    "queued_models",
]

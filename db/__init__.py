"""The job table, its engine and its state transitions. Imports neither Celery nor torch."""

from db.engine import make_engine, make_session_factory
from db.jobs import (
    Choice,
    Job,
    NewJob,
    Outcome,
    cancel_job,
    claim_jobs,
    count_unfinished,
    create_jobs,
    delete_jobs,
    finish_jobs,
    get_job,
    get_jobs,
    list_jobs,
    prune_jobs,
)
from db.migrate import upgrade
from db.models import FINISHED_STATUSES, JobRow, JobStatus
from db.stats import FinishedJob, count_by_status, finished_since, queued_models

__all__ = [
    # rows and snapshots
    "FINISHED_STATUSES",
    "Choice",
    "Job",
    "JobRow",
    "JobStatus",
    "NewJob",
    "Outcome",
    "FinishedJob",
    # engine and schema
    "make_engine",
    "make_session_factory",
    "upgrade",
    # state transitions
    "cancel_job",
    "claim_jobs",
    "count_unfinished",
    "create_jobs",
    "delete_jobs",
    "finish_jobs",
    "get_job",
    "get_jobs",
    "list_jobs",
    "prune_jobs",
    # aggregates
    "count_by_status",
    "finished_since",
    "queued_models",
]

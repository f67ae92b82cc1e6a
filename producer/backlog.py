"""The backlog signal autoscalers read: per model, the tokens queued and how many workers
would drain them in time; per tenant, what it has queued and what it was served.

Everything is counted from the database rows (the truth about a job), not from Redis
lists: a model's messages wait in several lists (kombu's ten priority lists of each
tenant's lane queues and of the model's queue), and the messages a worker holds but has
not started are in none of them, so a list's length reads 0 while every worker is busy.
A queued row is a job not yet running, wherever its message is.

- ``queued_tokens``: per queued job, its estimated prompt tokens plus its tenant's
  new-token ratio (what the tenant's jobs of that model generate of their most, from
  Redis, :meth:`completion_queue.FairQueues.new_token_ratios`; the model's for a tenant
  none of whose jobs finished) times the most it may generate; both estimates are
  written into the row at submit (``jobs.cost_*``).
- ``tokens_per_s_per_worker``: prompt plus completion tokens of the jobs finished in the
  last :data:`RATE_WINDOW_S`, over the seconds each worker spent on them (its first start
  to its last finish in the window); ``CQ_SCALE_WORKER_TOKENS_PER_S`` until a job finished.
- ``desired_workers`` = ceil(queued_tokens ÷ (tokens_per_s_per_worker *
  ``CQ_SCALE_DRAIN_TARGET_S``)), at least 1 while a job is queued or running, 0 when none.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from completion_queue import FairQueues, Settings, queue_name, served_models
from db import JobStatus, Load, Served, served_since, unfinished_load, utcnow

#: Seconds of finished jobs a worker's tokens per second are measured over.
RATE_WINDOW_S = 60.0

#: A worker's busy time in the window counts at least this long (one instant batch is no rate).
MIN_BUSY_S = 1.0


@dataclass(frozen=True, slots=True)
class ModelBacklog:
    """One model's backlog signal (``GET /backlog/<model>``, ``cq backlog``)."""

    queued_jobs: int
    queued_tokens: int
    running_jobs: int
    workers: int
    tokens_per_s_per_worker: float
    #: False while ``tokens_per_s_per_worker`` is the assumed setting (nothing finished lately).
    measured: bool
    desired_workers: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """What one tenant has queued for one model and was served of it in a window."""

    model: str
    tenant: str | None
    queued_jobs: int
    queued_tokens: int
    served_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def desired_workers(
    *, queued_jobs: int, running_jobs: int, queued_tokens: int, tokens_per_s: float, drain_s: float
) -> int:
    """Workers that drain ``queued_tokens`` within ``drain_s`` at ``tokens_per_s`` each; at
    least 1 while any job is queued or running, 0 when none is."""
    if queued_jobs == 0 and running_jobs == 0:
        return 0
    return max(1, math.ceil(queued_tokens / (tokens_per_s * drain_s)))


def worker_rates(served: Iterable[Served], *, since: datetime) -> dict[str, float]:
    """Return each model's tokens per second per worker, from what its workers served since
    ``since`` (models with nothing served are absent)."""
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    first: dict[tuple[str, str], datetime] = {}
    last: dict[tuple[str, str], datetime] = {}
    for row in served:
        if row.worker is None or row.first_started_at is None:
            continue
        key = (row.model, row.worker)
        tokens[key] += row.tokens
        start = max(row.first_started_at, since)
        first[key] = min(first.get(key, start), start)
        last[key] = max(last.get(key, row.last_finished_at), row.last_finished_at)
    totals: dict[str, int] = defaultdict(int)
    busy: dict[str, float] = defaultdict(float)
    for key, count in tokens.items():
        totals[key[0]] += count
        busy[key[0]] += max((last[key] - first[key]).total_seconds(), MIN_BUSY_S)
    return {model: totals[model] / busy[model] for model in totals if totals[model] > 0}


def _queued_tokens(load: Load, ratios: Mapping[str, tuple[float, Mapping[str, float]]]) -> int:
    model, tenants = ratios[load.model]
    ratio = tenants.get(load.tenant or "", model)
    return round(load.prompt_tokens + ratio * load.new_tokens)


def _ratios(client: Any, models: Iterable[str]) -> dict[str, tuple[float, Mapping[str, float]]]:
    return {model: FairQueues(client, queue_name(model)).new_token_ratios() for model in models}


def model_backlogs(settings: Settings, session: Session, client: Any) -> dict[str, ModelBacklog]:
    """Return the backlog signal of every model with unfinished jobs or a live worker.

    Args:
        settings: the drain target and the assumed worker rate.
        session: a session on the jobs database.
        client: a redis-py client on the broker (new-token ratios, live workers).
    """
    now = utcnow()
    since = now - timedelta(seconds=RATE_WINDOW_S)
    loads = unfinished_load(session)
    rates = worker_rates(served_since(session, since=since), since=since)
    workers = served_models(client)
    models = sorted({load.model for load in loads} | set(workers))
    ratios = _ratios(client, models)
    queued: dict[str, list[int]] = {model: [0, 0] for model in models}
    running: dict[str, int] = dict.fromkeys(models, 0)
    for load in loads:
        if load.status is JobStatus.QUEUED:
            queued[load.model][0] += load.jobs
            queued[load.model][1] += _queued_tokens(load, ratios)
        else:
            running[load.model] += load.jobs
    result = {}
    for model in models:
        rate = rates.get(model, settings.scale_worker_tokens_per_s)
        jobs, tokens = queued[model]
        result[model] = ModelBacklog(
            queued_jobs=jobs,
            queued_tokens=tokens,
            running_jobs=running[model],
            workers=workers.get(model, 0),
            tokens_per_s_per_worker=round(rate, 1),
            measured=model in rates,
            desired_workers=desired_workers(
                queued_jobs=jobs,
                running_jobs=running[model],
                queued_tokens=tokens,
                tokens_per_s=rate,
                drain_s=settings.scale_drain_target_s,
            ),
        )
    return result


def idle_backlog(settings: Settings) -> ModelBacklog:
    """The signal of a model with no job and no worker: nothing to do, 0 workers wanted."""
    return ModelBacklog(0, 0, 0, 0, settings.scale_worker_tokens_per_s, False, 0)


def tenant_loads(session: Session, client: Any, *, window_s: float) -> list[TenantLoad]:
    """Return, per model and tenant, its queued jobs and tokens (estimated as in
    :func:`model_backlogs`) and the tokens it was served in the last ``window_s`` seconds."""
    loads = [load for load in unfinished_load(session) if load.status is JobStatus.QUEUED]
    served = served_since(session, since=utcnow() - timedelta(seconds=window_s))
    ratios = _ratios(client, {load.model for load in loads})
    rows: dict[tuple[str, str | None], list[int]] = defaultdict(lambda: [0, 0, 0])
    for load in loads:
        row = rows[(load.model, load.tenant)]
        row[0] += load.jobs
        row[1] += _queued_tokens(load, ratios)
    for done in served:
        rows[(done.model, done.tenant)][2] += done.tokens
    return [
        TenantLoad(model, tenant, jobs, tokens, served_tokens)
        for (model, tenant), (jobs, tokens, served_tokens) in sorted(
            rows.items(), key=lambda item: (item[0][0], item[0][1] or "")
        )
    ]

"""The operator's routes: the backlog signal autoscalers read (``/backlog``) and Prometheus
metrics (``/metrics``). Outside ``/v1`` and its tenants: loopback peers, or an operator key
(``CQ_OPERATOR_KEYS``), since they show every tenant's load."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.state import APIState, State, operator
from completion_queue import JobStatusCollector, TableCollector
from db import count_by_status
from producer.backlog import idle_backlog, model_backlogs, tenant_loads
from producer.stats import broker_client

router = APIRouter(tags=["operator"], dependencies=[Depends(operator)])

#: The window of ``cq_tenant_served_tokens`` (``cq stats``'s default window).
SERVED_WINDOW_S = 300.0

BACKLOG_GAUGES = {
    "cq_backlog_queued_jobs": "Jobs queued (not yet running), by model.",
    "cq_backlog_queued_tokens": "Estimated tokens of the queued jobs: prompt plus new-token "
    "ratio times their most new tokens, by model.",
    "cq_backlog_running_jobs": "Jobs running, by model.",
    "cq_backlog_workers": "Live workers, by model.",
    "cq_backlog_tokens_per_s_per_worker": "Tokens served per second per worker over the last "
    "minute (CQ_SCALE_WORKER_TOKENS_PER_S until measured), by model.",
    "cq_backlog_desired_workers": "Workers that drain the queued tokens within "
    "CQ_SCALE_DRAIN_TARGET_S, by model.",
}
TENANT_GAUGES = {
    "cq_tenant_queued_jobs": "Jobs queued (not yet running), by model and tenant.",
    "cq_tenant_queued_tokens": "Estimated tokens of the queued jobs, by model and tenant.",
    "cq_tenant_served_tokens": f"Prompt plus completion tokens of the jobs finished in the last "
    f"{SERVED_WINDOW_S:.0f} s, by model and tenant.",
}


def _backlogs(state: APIState) -> dict[str, Any]:
    with state.client.sessions() as session, broker_client(state.client.app) as client:
        return model_backlogs(state.settings, session, client)


#: Gauge rows: label values, and values by gauge name.
Rows = list[tuple[list[str], dict[str, Any]]]


def _backlog_rows(state: APIState) -> Rows:
    rows: Rows = []
    for model, found in _backlogs(state).items():
        values = {f"cq_backlog_{name}": value for name, value in found.to_dict().items()}
        rows.append(([model], values))
    return rows


def _tenant_rows(state: APIState) -> Rows:
    with state.client.sessions() as session, broker_client(state.client.app) as client:
        loads = tenant_loads(session, client, window_s=SERVED_WINDOW_S)
    return [
        (
            [load.model, load.tenant or ""],
            {f"cq_tenant_{name}": value for name, value in load.to_dict().items()},
        )
        for load in loads
    ]


@router.get("/backlog")
def backlog(state: State) -> dict[str, Any]:
    """Every model's backlog signal: queued jobs and tokens, running jobs, workers, their
    measured tokens/s, and the workers that would drain the queue in time."""
    return {"models": {model: b.to_dict() for model, b in _backlogs(state).items()}}


@router.get("/backlog/{model:path}")
def model_backlog(model: str, state: State) -> dict[str, Any]:
    """One model's backlog signal, flat (KEDA's metrics-api trigger reads ``desired_workers``);
    a model with no job and no worker reads 0 workers wanted."""
    found = _backlogs(state).get(model) or idle_backlog(state.settings)
    return found.to_dict()


@router.get("/metrics")
def metrics(state: State) -> Response:
    """Prometheus metrics read now: jobs per status, each model's backlog, each tenant's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobStatusCollector(lambda: _status_counts(state)))
    registry.register(TableCollector(BACKLOG_GAUGES, ["model"], lambda: _backlog_rows(state)))
    registry.register(
        TableCollector(TENANT_GAUGES, ["model", "tenant"], lambda: _tenant_rows(state))
    )
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _status_counts(state: APIState) -> dict[str, int]:
    with state.client.sessions() as session:
        return {status.value: n for status, n in count_by_status(session).items()}

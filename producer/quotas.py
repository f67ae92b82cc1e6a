"""What a submit may add: the cluster's queue bound, and a tenant's models and queue bound.

Checked in the transaction that writes the jobs, under a lock while a queue bound
applies (``lock_queue_bounds``; the client's own lock across its threads), so
submits at once cannot each count the others out. Each refusal says which limit
and how full.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from completion_queue import ModelNotAllowed, QueueFull, Settings
from db import Tenant, count_queued, lock_queue_bounds


def check_quotas(
    session: Session, settings: Settings, tenant: Tenant | None, models: set[str], count: int
) -> None:
    """Refuse ``count`` more jobs of ``models`` past the tenant's quotas or the cluster's.

    Raises :class:`ModelNotAllowed` for a model outside the tenant's ``--models``, and
    :class:`QueueFull` past its ``--max-queued`` or past ``CQ_MAX_QUEUED_JOBS``.
    """
    if tenant is not None and tenant.models is not None and not models <= set(tenant.models):
        (model, *_) = sorted(models - set(tenant.models))
        raise ModelNotAllowed(
            f"the model {model!r} does not exist or you do not have access to it; "
            f"you may use: {', '.join(tenant.models)}"
        )
    if queue_bounded(settings, tenant):
        lock_queue_bounds(session)
    if tenant is not None and tenant.max_queued is not None:
        queued = count_queued(session, tenant=tenant.name)
        if queued + count > tenant.max_queued:
            raise QueueFull(
                f"tenant {tenant.name} has {queued} jobs queued and may have "
                f"{tenant.max_queued} (its --max-queued): {count} more would not fit; retry later"
            )
    limit = settings.max_queued_jobs
    if limit:
        queued = count_queued(session)
        if queued + count > limit:
            raise QueueFull(
                f"the queue holds {queued} jobs and max_queued_jobs is {limit}: "
                f"{count} more would not fit; retry later"
            )


def queue_bounded(settings: Settings, tenant: Tenant | None) -> bool:
    """Whether a submit must count queued jobs: ``CQ_MAX_QUEUED_JOBS`` or a ``--max-queued``."""
    return bool(settings.max_queued_jobs) or (tenant is not None and tenant.max_queued is not None)

"""The Python client other services use: submit jobs, then poll the database for them."""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, overload

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from completion_queue import (
    BrokerUnavailable,
    IdempotencyConflict,
    JobNotFound,
    Settings,
    ValidationError,
    create_app,
    job_cost,
    published_broker_url,
    redact_url,
    resolve_broker_url,
    send_jobs,
    served_models,
)
from db import (
    LANE_INTERACTIVE,
    Job,
    JobStatus,
    NewJob,
    Tenant,
    cancel_job,
    create_jobs,
    error_dict,
    get_job,
    list_jobs,
    make_engine,
    make_session_factory,
    withdraw_jobs,
)
from producer.quotas import check_quotas, queue_bounded
from producer.scheduling import resolve_deadline, resolve_lane
from producer.schema import CompletionRequest, Limits, validate_request
from producer.stats import broker_client
from producer.stream import follow, text_of
from producer.waits import WAITS_LOCK, Waits

JobRef = uuid.UUID | str | Job
Progress = Callable[[int, int], None]


def _costed(job: NewJob) -> NewJob:
    """Return ``job`` with its estimated cost, which its row keeps for the backlog signal."""
    return dataclasses.replace(job, cost=job_cost(job))


def same_request(new: NewJob, job: Job) -> bool:
    """True when ``job`` (found under ``new``'s idempotency key) was made by the same request."""
    return (new.model, new.prompt, new.messages, new.params, new.priority, new.callback_url) == (
        job.model,
        job.prompt,
        job.messages,
        job.params,
        job.priority,
        job.callback_url,
    )


def _job_id(ref: JobRef) -> uuid.UUID:
    if isinstance(ref, Job):
        return ref.id
    if isinstance(ref, uuid.UUID):
        return ref
    try:
        return uuid.UUID(str(ref))
    except ValueError:
        raise ValidationError(f"job id must be a UUID, got {ref!r}", field="id") from None


class CompletionClient:
    """Submit completion jobs to the queue and read their rows back.

    Args:
        broker_url: Redis URL; defaults to ``CQ_BROKER_URL`` (or a running ``cq up``).
        database_url: SQLAlchemy URL; defaults to ``CQ_DATABASE_URL`` (or the local SQLite file).
        settings: the settings to use; read from the environment when omitted.
        tenant: a tenant's name (see ``cq keys``): what is submitted is theirs, and
            only their jobs are seen. None (the default): jobs without a tenant are
            submitted, and every job is seen, as the operator sees them.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        tenant: str | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.limits = Limits.from_settings(self.settings)
        self.tenant = tenant
        self._broker_url = broker_url
        self.database_url = database_url or self.settings.resolved_database_url()
        self._engine = make_engine(self.database_url)
        self._sessions = make_session_factory(self._engine)
        self._app: Celery | None = None
        self._app_url: str | None = None
        self._app_lock = threading.Lock()
        #: Orders this process's submits under a queue bound (tenant views share it).
        self._bounds_lock = threading.Lock()
        self._owner: CompletionClient | None = None
        #: A tenant's quotas, enforced on submit (the API's tenants; see :meth:`as_tenant`).
        self.quota: Tenant | None = None

    def as_tenant(self, tenant: Tenant | str | None) -> CompletionClient:
        """This client for ``tenant``, on the same connections (closing it closes nothing).

        Given a :class:`db.Tenant`, its quotas hold on submit: the models it may use
        (:class:`ModelNotAllowed`) and the most jobs it may have queued (:class:`QueueFull`).
        """
        view = copy.copy(self)
        view.tenant = tenant.name if isinstance(tenant, Tenant) else tenant
        view.quota = tenant if isinstance(tenant, Tenant) else None
        view._owner = self._owner or self
        return view

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory on the client's database."""
        return self._sessions

    @property
    def app(self) -> Celery:
        """The Celery app used to send, created on first use."""
        if self._owner is not None:
            return self._owner.app
        with self._app_lock:
            if self._app is None or self._embedded_broker_moved():
                if self._app is not None:
                    self._app.close()
                self._app_url = self._broker_url or resolve_broker_url(self.settings)
                self._app = create_app(self.settings, self._app_url)
            return self._app

    def _embedded_broker_moved(self) -> bool:
        """Whether the embedded broker (no URL configured) was restarted at another URL:
        a ``cq up`` started again publishes its new redis-server's, and a long-lived
        client (``cq api``) follows it rather than failing until it is restarted."""
        if self._broker_url or self.settings.broker_url:
            return False
        published = published_broker_url(self.settings)
        return bool(published) and published != self._app_url

    # -- submitting -------------------------------------------------------------

    def submit(
        self,
        prompt: str | None = None,
        *,
        lane: str = LANE_INTERACTIVE,
        deadline: datetime | float | None = None,
        **params: Any,
    ) -> Job:
        """Validate, store and queue one job; return it (an existing one for a known key).

        Give a ``prompt``, or chat ``messages=[{"role": "user", "content": ...}]``
        (rendered with the model's chat template); the other parameters are those
        of :class:`producer.CompletionRequest`. ``lane`` is ``interactive`` or
        ``batch`` (interactive work goes first); ``deadline`` (a timezone-aware time,
        or seconds from now) is when the job must have started by, else it fails
        with ``DeadlineExceeded`` without running.
        """
        data = {**params, "lane": lane, "deadline": deadline}
        if prompt is not None:
            data["prompt"] = prompt
        request = validate_request(data, self.limits)
        return self._store_and_send([request], batch_id=None)[0]

    def submit_many(
        self,
        requests: Iterable[Mapping[str, Any] | CompletionRequest],
        *,
        batch_id: str | None = None,
        in_transaction: Callable[[Session, builtins.list[Job]], None] | None = None,
        lane: str = LANE_INTERACTIVE,
        deadline: datetime | float | None = None,
    ) -> builtins.list[Job]:
        """Validate all requests, store them in one transaction, then queue them.

        ``lane`` and ``deadline`` (as in :meth:`submit`, seconds counted from this call)
        hold for every request that does not name its own.

        All or nothing: nothing is written or queued unless every request is valid
        and no idempotency key was used before for a different request
        (:class:`IdempotencyConflict`). ``in_transaction(session, jobs)`` runs in
        the transaction that writes the jobs, before anything is queued, to write
        what belongs with them (raising from it writes nothing). If the broker
        cannot be reached, the jobs just written are taken back (see
        :func:`db.withdraw_jobs`) and :class:`BrokerUnavailable` is raised.
        """
        lane = resolve_lane(lane)
        when = None if deadline is None else resolve_deadline(deadline)
        validated: list[CompletionRequest] = []
        for index, data in enumerate(requests):
            if len(validated) >= self.settings.max_batch_requests:
                raise ValidationError(
                    f"requests must hold at most {self.settings.max_batch_requests} items",
                    field="requests",
                )
            try:
                validated.append(validate_request(data, self.limits))
            except ValidationError as exc:
                raise ValidationError(f"requests[{index}]: {exc}", field=exc.field) from None
        return self._store_and_send(
            validated, batch_id=batch_id, in_transaction=in_transaction, lane=lane, deadline=when
        )

    def _store_and_send(
        self,
        validated: Sequence[CompletionRequest],
        *,
        batch_id: str | None,
        in_transaction: Callable[[Session, builtins.list[Job]], None] | None = None,
        lane: str = LANE_INTERACTIVE,
        deadline: datetime | None = None,
    ) -> builtins.list[Job]:
        """Store ``validated`` and queue them; a request's own lane and deadline win over
        ``lane`` and ``deadline``."""
        if not validated:
            return []
        app = self.app  # a broker URL that is wrong (ConfigError) is refused before any write
        models = {req.model or self.settings.model for req in validated}
        new_jobs = [
            _costed(
                NewJob(
                    model=req.model or self.settings.model,
                    prompt=req.prompt or "",
                    messages=req.stored_messages(),
                    params=req.params(),
                    priority=req.priority,
                    idempotency_key=req.idempotency_key,
                    batch_id=batch_id,
                    callback_url=req.callback_url,
                    tenant=self.tenant,
                    lane=req.lane or lane,
                    deadline=req.deadline or deadline,
                )
            )
            for req in validated
        ]
        bounded = queue_bounded(self.settings, self.quota)
        with (
            self._bounds_lock if bounded else contextlib.nullcontext(),
            self._sessions.begin() as session,
        ):
            check_quotas(session, self.settings, self.quota, models, len(validated))
            created = create_jobs(session, jobs=new_jobs)
            for new, (job, is_new) in zip(new_jobs, created, strict=True):
                if not is_new and not same_request(new, job):
                    raise IdempotencyConflict(
                        f"idempotency key {job.idempotency_key!r} was used for a different "
                        f"request (job {job.id})"
                    )
            if in_transaction is not None:
                in_transaction(session, [job for job, _ in created])
        to_send = [job for job, is_new in created if is_new]
        try:
            if to_send:
                send_jobs(app, to_send)
        except Exception as exc:
            unavailable = BrokerUnavailable(
                f"could not queue {len(to_send)} job(s) on {redact_url(app.conf.broker_url)}: "
                f"{type(exc).__name__}: {redact_url(str(exc))}"
            )
            with self._sessions.begin() as session:
                withdraw_jobs(
                    session, job_ids=[job.id for job in to_send], error=error_dict(unavailable)
                )
            raise unavailable from None
        return [job for job, _ in created]

    # -- reading ----------------------------------------------------------------

    def get(self, job_id: JobRef) -> Job:
        """Return the job's current row; raise :class:`JobNotFound` for an unknown id."""
        with self._sessions() as session:
            job = get_job(session, job_id=_job_id(job_id), tenant=self.tenant)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}")
        return job

    def stream(self, job_id: JobRef, idle_timeout: float | None = None) -> Iterator[str]:
        """Yield the job's first choice as it generates, until its row is finished (:meth:`get`).

        Every step of a job submitted with ``stream=True``, every progress refresh of others;
        :func:`producer.follow` gives all choices. Raises as :func:`producer.follow` does.
        """
        return text_of(follow(self, [_job_id(job_id)], idle_timeout_s=idle_timeout))

    @overload
    def wait(  # type: ignore[overload-overlap]
        self, job_ids: JobRef, timeout: float = ..., on_progress: Progress | None = ...
    ) -> Job: ...
    @overload
    def wait(
        self,
        job_ids: Iterable[JobRef],
        timeout: float = ...,
        on_progress: Progress | None = ...,
    ) -> builtins.list[Job]: ...

    def wait(
        self,
        job_ids: JobRef | Iterable[JobRef],
        timeout: float = 60.0,
        on_progress: Progress | None = None,
    ) -> Job | builtins.list[Job]:
        """Wait until the jobs are finished; return them (in the order given).

        On PostgreSQL it listens for the jobs' notifications (``LISTEN cq_jobs``, one
        connection per client); elsewhere it polls with a backoff (see :mod:`producer.waits`).
        ``on_progress(finished, total)`` is called whenever that count may have changed.

        Raises:
            JobTimeout: some job is still queued or running after ``timeout`` seconds.
            JobNotFound: an id does not exist.
        """
        single = isinstance(job_ids, uuid.UUID | str | Job)
        if isinstance(job_ids, uuid.UUID | str | Job):
            ids = [_job_id(job_ids)]
        else:
            ids = [_job_id(ref) for ref in job_ids]
        ordered = self._waits().wait(
            ids, tenant=self.tenant, timeout=timeout, on_progress=on_progress
        )
        return ordered[0] if single else ordered

    async def wait_async(
        self, job_ids: Iterable[JobRef], timeout: float = 60.0
    ) -> builtins.list[Job]:
        """:meth:`wait` for asyncio code: no thread is held while it waits."""
        ids = [_job_id(ref) for ref in job_ids]
        return await self._waits().wait_async(ids, tenant=self.tenant, timeout=timeout)

    #: How this client waits, made by its first wait and shared with its tenant views.
    _shared_waits: Waits | None = None

    def _waits(self) -> Waits:
        owner = self._owner or self
        with WAITS_LOCK:
            if owner._shared_waits is None:
                owner._shared_waits = Waits(owner._engine, owner._sessions)
                # A client dropped without close(): its LISTEN thread (which holds the
                # engine, so its pooled connection too) must not outlive it.
                weakref.finalize(owner, owner._shared_waits.close)
            return owner._shared_waits

    def cancel(self, job_id: JobRef) -> Job:
        """Cancel a queued or running job; a finished one is returned unchanged."""
        with self._sessions.begin() as session:
            job = cancel_job(session, job_id=_job_id(job_id), tenant=self.tenant)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}")
        return job

    def list(
        self,
        status: JobStatus | str | None = None,
        batch_id: str | None = None,
        limit: int = 100,
        *,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> builtins.list[Job]:
        """Return up to ``limit`` jobs, newest first; ``after``: the last (created_at, id) seen."""
        if status is not None:
            try:
                status = JobStatus(status)
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise ValidationError(
                    f"status must be one of {allowed}, got {status!r}", field="status"
                ) from None
        if limit < 1:
            raise ValidationError(f"limit must be >= 1, got {limit}", field="limit")
        with self._sessions() as session:
            return list_jobs(
                session,
                status=status,
                batch_id=batch_id,
                tenant=self.tenant,
                limit=limit,
                after=after,
            )

    def served_models(self) -> dict[str, int]:
        """The models live workers serve now, with how many workers serve each (one round trip
        to Redis; see :mod:`completion_queue.presence`)."""
        with broker_client(self.app) as client:
            return served_models(client)

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Release database and broker connections (a tenant's view leaves them open)."""
        if self._owner is not None:
            return
        if self._shared_waits is not None:
            self._shared_waits.close()
        self._engine.dispose()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> CompletionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

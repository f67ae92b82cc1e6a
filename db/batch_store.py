"""The API's uploaded files and OpenAI-style batches, as stored."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, delete, select, tuple_, update
from sqlalchemy.orm import InstrumentedAttribute, Session, defer

from db.models import BatchRow, FileRow
from db.snapshots import aware, utcnow


def new_id(prefix: str) -> str:
    """Return a fresh id in OpenAI's style, e.g. ``file-3f2a...`` or ``batch_9c1e...``."""
    return f"{prefix}{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """An uploaded file's metadata (its content is read separately)."""

    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Batch:
    """A snapshot of one batch row."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    requests: list[tuple[str, list[uuid.UUID]]]
    created_at: datetime
    cancelled_at: datetime | None

    @property
    def job_ids(self) -> list[uuid.UUID]:
        """Every job of the batch, in input order."""
        return [job_id for _, ids in self.requests for job_id in ids]

    @classmethod
    def from_row(cls, row: BatchRow) -> Batch:
        """Build a snapshot from an ORM row."""
        created = aware(row.created_at)
        assert created is not None
        return cls(
            id=row.id,
            input_file_id=row.input_file_id,
            endpoint=row.endpoint,
            completion_window=row.completion_window,
            metadata=row.meta,
            requests=[(str(cid), [uuid.UUID(i) for i in ids]) for cid, ids in row.requests],
            created_at=created,
            cancelled_at=aware(row.cancelled_at),
        )


def _file(row: FileRow) -> StoredFile:
    created = aware(row.created_at)
    assert created is not None
    return StoredFile(row.id, row.purpose, row.filename, row.size_bytes, created)


def create_file(
    session: Session, *, purpose: str, filename: str, content: bytes, tenant: str | None = None
) -> StoredFile:
    """Store an uploaded file of ``tenant``'s; return its metadata."""
    row = FileRow(
        id=new_id("file-"),
        purpose=purpose,
        filename=filename,
        size_bytes=len(content),
        content=content,
        created_at=utcnow(),
        tenant=tenant,
    )
    session.add(row)
    session.flush()
    return _file(row)


def _file_row(session: Session, file_id: str, tenant: str | None) -> FileRow | None:
    row = session.get(FileRow, file_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None
    return row


def get_file(session: Session, *, file_id: str, tenant: str | None = None) -> StoredFile | None:
    """Return a stored file's metadata, or None if there is no such id (of ``tenant``'s)."""
    row = _file_row(session, file_id, tenant)
    return _file(row) if row is not None else None


def _page_after(
    created: InstrumentedAttribute[datetime],
    key: InstrumentedAttribute[str],
    anchor: Any,
    after: str,
    descending: bool,
) -> ColumnElement[bool]:
    """The keyset filter of rows after ``(anchor's created_at, after)`` in the listing's order.

    A row-value comparison: an index on ``(tenant, created_at, id)`` seeks straight to it.
    """
    row, last = tuple_(created, key), tuple_(anchor, after)
    return row < last if descending else row > last


def list_files(
    session: Session,
    *,
    tenant: str | None = None,
    purpose: str | None = None,
    limit: int = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> list[StoredFile] | None:
    """Return up to ``limit`` stored files of ``tenant``'s by ``(created_at, id)`` in ``order``.

    ``after`` is a file id: the page starts just after it (keyset pagination,
    stable under inserts). None when ``after`` is no file (of ``tenant``'s).
    Contents are not read.
    """
    owned = () if tenant is None else (FileRow.tenant == tenant,)
    descending = order == "desc"
    by = (FileRow.created_at, FileRow.id)
    stmt = (
        select(FileRow)
        .options(defer(FileRow.content))
        .where(*owned)
        .order_by(*(column.desc() if descending else column.asc() for column in by))
        .limit(limit)
    )
    if purpose is not None:
        stmt = stmt.where(FileRow.purpose == purpose)
    if after is not None:
        anchor = select(FileRow.created_at).where(FileRow.id == after, *owned)
        if session.execute(anchor).first() is None:
            return None
        stmt = stmt.where(_page_after(*by, anchor.scalar_subquery(), after, descending))
    return [_file(row) for row in session.scalars(stmt)]


def delete_file(session: Session, *, file_id: str, tenant: str | None = None) -> bool:
    """Delete a stored file (of ``tenant``'s); return whether there was one."""
    owned = () if tenant is None else (FileRow.tenant == tenant,)
    deleted = session.scalars(
        delete(FileRow).where(FileRow.id == file_id, *owned).returning(FileRow.id)
    ).all()
    return bool(deleted)


def get_file_content(session: Session, *, file_id: str, tenant: str | None = None) -> bytes | None:
    """Return a stored file's bytes, or None if there is no such id (of ``tenant``'s)."""
    row = _file_row(session, file_id, tenant)
    return bytes(row.content) if row is not None else None


#: How long a batch may take (OpenAI's only ``completion_window``, "24h"): its lines' deadline.
BATCH_WINDOW = timedelta(hours=24)


def create_batch(
    session: Session,
    *,
    batch_id: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    requests: list[tuple[str, list[uuid.UUID]]],
    tenant: str | None = None,
    created_at: datetime | None = None,
) -> Batch:
    """Store a batch of ``tenant``'s whose jobs were created under ``batch_id``; return it.

    ``created_at`` (now, when omitted) is when its window opened: its lines' deadline is
    ``created_at + BATCH_WINDOW``.
    """
    row = BatchRow(
        tenant=tenant,
        id=batch_id,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        meta=metadata,
        requests=[[cid, [str(i) for i in ids]] for cid, ids in requests],
        created_at=created_at or utcnow(),
    )
    session.add(row)
    session.flush()
    return Batch.from_row(row)


def delete_batch(session: Session, *, batch_id: str) -> None:
    """Delete a batch whose jobs could not be queued (they were taken back)."""
    session.execute(delete(BatchRow).where(BatchRow.id == batch_id))


def get_batch(session: Session, *, batch_id: str, tenant: str | None = None) -> Batch | None:
    """Return the batch, or None if there is no such id (of ``tenant``'s, when given)."""
    row = session.get(BatchRow, batch_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None
    return Batch.from_row(row)


def list_batches(
    session: Session, *, tenant: str | None = None, limit: int = 20, after: str | None = None
) -> list[Batch] | None:
    """Return up to ``limit`` batches of ``tenant``'s, newest first (by ``(created_at, id)``).

    ``after`` is a batch id: the page starts just after it (keyset pagination).
    None when ``after`` is no batch (of ``tenant``'s).
    """
    owned = () if tenant is None else (BatchRow.tenant == tenant,)
    by = (BatchRow.created_at, BatchRow.id)
    stmt = select(BatchRow).where(*owned).order_by(*(c.desc() for c in by)).limit(limit)
    if after is not None:
        anchor = select(BatchRow.created_at).where(BatchRow.id == after, *owned)
        if session.execute(anchor).first() is None:
            return None
        stmt = stmt.where(_page_after(*by, anchor.scalar_subquery(), after, True))
    return [Batch.from_row(row) for row in session.scalars(stmt)]


def mark_batch_cancelled(session: Session, *, batch_id: str) -> None:
    """Record when a batch was cancelled (the first cancel wins)."""
    session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.cancelled_at.is_(None))
        .values(cancelled_at=utcnow())
        .execution_options(synchronize_session=False)
    )

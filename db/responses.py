"""OpenAI responses as stored: what each adds to its job (its row has the job's id)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import JobRow, ResponseRow


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A snapshot of one response row (its job holds the rest)."""

    id: uuid.UUID
    instructions: str | None
    input: list[dict[str, Any]]
    previous_response_id: str | None
    metadata: dict[str, str] | None
    text: dict[str, Any] | None
    background: bool

    @classmethod
    def from_row(cls, row: ResponseRow) -> StoredResponse:
        """Build a snapshot from an ORM row."""
        return cls(
            id=row.id,
            instructions=row.instructions,
            input=list(row.input),
            previous_response_id=row.previous_response_id,
            metadata=row.meta,
            text=row.text,
            background=row.background,
        )


def create_response(
    session: Session, *, response: StoredResponse, tenant: str | None = None
) -> None:
    """Store what ``response`` adds to its job (written in the job's own transaction)."""
    session.add(
        ResponseRow(
            id=response.id,
            tenant=tenant,
            instructions=response.instructions,
            input=response.input,
            previous_response_id=response.previous_response_id,
            meta=response.metadata,
            text=response.text,
            background=response.background,
        )
    )


def get_response(
    session: Session, *, response_id: uuid.UUID, tenant: str | None = None
) -> StoredResponse | None:
    """Return the response, or None if there is no such id (of ``tenant``'s, when given)."""
    row = session.get(ResponseRow, response_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None
    return StoredResponse.from_row(row)


def get_responses(
    session: Session, *, response_ids: list[uuid.UUID]
) -> dict[uuid.UUID, StoredResponse]:
    """Return the responses that exist among ``response_ids``, by id."""
    rows = session.scalars(select(ResponseRow).where(ResponseRow.id.in_(response_ids)))
    return {row.id: StoredResponse.from_row(row) for row in rows}


def delete_response(session: Session, *, response_id: uuid.UUID) -> None:
    """Delete a response and its job (a finished one: cancel it first)."""
    session.execute(delete(ResponseRow).where(ResponseRow.id == response_id))
    session.execute(delete(JobRow).where(JobRow.id == response_id))

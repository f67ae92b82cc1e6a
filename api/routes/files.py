"""``/v1/files``: upload a batch's JSONL input; list or delete uploads; read any file.

A finished batch's output and error files are made from its jobs when read: they
can be retrieved and downloaded, but are neither listed nor deletable.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from api.batch_output import file_view, find_output, jsonl, output_lines
from api.errors import APIError, not_found
from api.state import CallerDep
from api.views import ErrorInfo
from completion_queue import ValidationError
from db import StoredFile, create_file, delete_file, get_file, get_file_content, list_files

router = APIRouter(prefix="/v1", tags=["batches"])


@router.post("/files")
async def upload_file(
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="JSONL, one request per line.")],
    purpose: Annotated[str, Form(max_length=64, description="Only batch.")],
) -> dict[str, Any]:
    """Store a batch input file."""
    if purpose != "batch":
        # A 400 naming the field, as OpenAI answers, not the 422 of a Literal.
        raise ValidationError(f"purpose must be batch, got {purpose!r}", field="purpose")
    content = await file.read()
    with caller.client.sessions.begin() as session:
        stored = create_file(
            session,
            purpose=purpose,
            filename=(file.filename or "input.jsonl")[:255],
            content=content,
            tenant=caller.name,
        )
    return file_view(stored)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, caller: CallerDep) -> dict[str, Any]:
    """A file's metadata: an upload, or a finished batch's output or error file."""
    sessions = caller.client.sessions
    output = find_output(sessions, file_id, tenant=caller.name)
    if output is not None:
        batch, kind = output
        content = jsonl(output_lines(sessions, batch, kind))
        stored = StoredFile(
            file_id, f"batch_{kind}", f"{batch.id}_{kind}.jsonl", len(content), batch.created_at
        )
        return file_view(stored)
    with sessions() as session:
        stored_file = get_file(session, file_id=file_id, tenant=caller.name)
    if stored_file is None:
        raise not_found("file", file_id)
    return file_view(stored_file)


@router.get("/files/{file_id}/content", response_class=Response)
def file_content(file_id: str, caller: CallerDep) -> Response:
    """A file's bytes: an upload, or a finished batch's output or error JSONL."""
    sessions = caller.client.sessions
    output = find_output(sessions, file_id, tenant=caller.name)
    if output is not None:
        batch, kind = output
        lines = jsonl(output_lines(sessions, batch, kind))
        return Response(lines, media_type="application/jsonl")
    with sessions() as session:
        content = get_file_content(session, file_id=file_id, tenant=caller.name)
    if content is None:
        raise not_found("file", file_id)
    return Response(content, media_type="application/jsonl")


def page_limit(limit: int | None, *, default: int, most: int) -> int:
    """Return the page size asked for, ``default`` without one; out of ``1..most`` is a 400."""
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise ValidationError(f"limit must be between 1 and {most}, got {limit}", field="limit")
    return limit


def cursor_page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """Return ``data`` as OpenAI's cursor page (the client passes ``last_id`` back as ``after``)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@router.get("/files")
def list_files_route(
    caller: CallerDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int | None, Query(description="1 to 10000; 10000 without one.")] = None,
    order: Annotated[str, Query(description="By creation: asc, or desc (newest first).")] = "desc",
    after: Annotated[str | None, Query(max_length=64, description="A file id.")] = None,
) -> dict[str, Any]:
    """Uploaded files, a page at a time: pass the last id back as ``after``."""
    size = page_limit(limit, default=10_000, most=10_000)
    if order not in ("asc", "desc"):
        raise ValidationError(f"order must be asc or desc, got {order!r}", field="order")
    with caller.client.sessions() as session:
        stored = list_files(
            session,
            tenant=caller.name,
            purpose=purpose,
            limit=size + 1,
            order="asc" if order == "asc" else "desc",
            after=after,
        )
    if stored is None:
        raise ValidationError(
            f"after must be the id of one of your files, got {after!r}", field="after"
        )
    return cursor_page([file_view(one) for one in stored[:size]], has_more=len(stored) > size)


@router.delete("/files/{file_id}")
def delete_file_route(file_id: str, caller: CallerDep) -> dict[str, Any]:
    """Delete an uploaded file; batches made from it keep their requests."""
    sessions = caller.client.sessions
    output = find_output(sessions, file_id, tenant=caller.name)
    if output is not None:
        raise APIError(
            ErrorInfo(
                400,
                f"file {file_id} is batch {output[0].id}'s {output[1]} file, made from the "
                "batch's jobs when read: it cannot be deleted",
                param="id",
                code="file_not_deletable",
            )
        )
    with sessions.begin() as session:
        deleted = delete_file(session, file_id=file_id, tenant=caller.name)
    if not deleted:
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}

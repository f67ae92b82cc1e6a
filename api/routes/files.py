"""``/v1/files``: upload a batch's JSONL input; read an upload or a finished batch's output."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from api.batch_output import file_view, find_output, jsonl, output_lines
from api.errors import not_found
from api.state import CallerDep
from db import StoredFile, create_file, get_file, get_file_content

router = APIRouter(prefix="/v1", tags=["batches"])


@router.post("/files")
async def upload_file(
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="JSONL, one request per line.")],
    purpose: Annotated[Literal["batch"], Form(description="Only batch.")],
) -> dict[str, Any]:
    """Store a batch input file."""
    content = await file.read()
    with caller.client.sessions.begin() as session:
        stored = create_file(
            session, purpose=purpose, filename=(file.filename or "input.jsonl")[:255],
            content=content, tenant=caller.name,
        )  # fmt: skip
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

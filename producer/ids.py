"""Short ids, as git takes short hashes: a job or batch named by a unique prefix.

`cq list` shows eight characters of each id; every command that takes an id
takes such a prefix too, with a clear error when it names no job or more than one.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Sequence
from typing import TypeVar

from completion_queue import JobNotFound, ValidationError
from db import batch_ids_by_prefix, job_ids_by_prefix
from producer.client import CompletionClient

T = TypeVar("T")

#: The fewest hex digits a job id prefix may have.
MIN_PREFIX = 4


def find_job_id(client: CompletionClient, ref: str) -> uuid.UUID:
    """Return the id of the one job (of the client's tenant) that ``ref`` names.

    ``ref`` is a full id, or a prefix of at least :data:`MIN_PREFIX` hex digits
    (dashes ignored), or an OpenAI response id (``resp_`` and its job's hex). A full
    id is returned as it is: reading it says if it exists.
    """
    digits = ref.strip().lower().removeprefix("resp_").replace("-", "")
    if len(digits) == 32 and set(digits) <= set(string.hexdigits):
        return uuid.UUID(digits)
    if not MIN_PREFIX <= len(digits) < 32 or not set(digits) <= set(string.hexdigits):
        raise ValidationError(
            f"job id must be a UUID or a prefix of at least {MIN_PREFIX} hex digits, got {ref!r}",
            field="id",
        )
    with client.sessions() as session:
        found = job_ids_by_prefix(session, prefix=digits, tenant=client.tenant)
    return _the_one(found, ref, what="job id", field="id")


def find_batch_id(client: CompletionClient, ref: str) -> str:
    """Return the batch id that ``ref`` is, or the one batch id that starts with it."""
    with client.sessions() as session:
        found = batch_ids_by_prefix(session, prefix=ref, tenant=client.tenant)
    return _the_one(found, ref, what="batch id", field="batch")


def _the_one(found: Sequence[T], ref: str, *, what: str, field: str) -> T:
    """The one match of ``ref``; :class:`JobNotFound` for none, ValidationError for two."""
    if not found:
        raise JobNotFound(f"no {what} is or starts with {ref!r}")
    if len(found) > 1:
        raise ValidationError(
            f"{what} prefix {ref!r} is ambiguous: {found[0]}, {found[1]}, maybe more; "
            "give more characters",
            field=field,
        )
    return found[0]

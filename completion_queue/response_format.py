"""A job's ``response_format``: one model, read by the producer at submit and by the engine.

OpenAI's shape: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type":
"json_schema", "json_schema": {"name", "description", "schema", "strict"}}``.
:func:`parse_response_format` checks the shape and returns a :class:`ResponseFormat`;
the producer then calls :meth:`ResponseFormat.check_schema` (a valid JSON Schema,
within bounds, every keyword implemented by llguidance, the grammar library the
workers use, see ``engine/grammar.py``) and stores :meth:`ResponseFormat.stored` in
the job's params. The engine parses the stored form back (as compact JSON, the
grammar cache's key) and compiles :attr:`ResponseFormat.grammar_schema`; it skips
the schema checks: a stored format passed them at submit, and its compile refuses
what llguidance cannot enforce for the model's tokenizer anyway.
Errors are ``ValueError`` naming the part of ``response_format`` at fault
(``json_schema.schema is not a valid JSON Schema: ...``): the producer reports them
under the field ``response_format``, the engine as the job's error.

Why here: the format is a job parameter that both sides of the queue read, the
submitting side (``producer/``, which must import without torch or the worker
extra) and the running side (``engine/``, which must import without Celery,
kombu, redis or SQLAlchemy). ``completion_queue`` is the floor both stand on, and
its names load lazily, so importing this module brings only jsonschema and
llguidance, both base dependencies. In ``engine/`` it would tie the producer
library to the engine package, whose modules import torch and transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
import llguidance

#: Longest JSON schema, as canonical JSON.
MAX_SCHEMA_CHARS = 32_000
#: What ``{"type": "json_object"}`` asks for: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A parsed ``response_format``; ``name``, ``schema`` and ``strict`` only for json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    #: Kept as given: its properties are generated in the order it lists them.
    schema: dict[str, Any] | None = None
    #: Accepted and stored; it changes nothing, as every schema is enforced or refused.
    strict: bool | None = None

    @property
    def grammar_schema(self) -> dict[str, Any] | None:
        """The JSON schema generation must follow; None for free text."""
        if self.type == "json_object":
            return ANY_OBJECT
        return self.schema

    def stored(self) -> dict[str, Any] | None:
        """Return the normalised form kept in ``jobs.params``; None for text (not stored)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        body: dict[str, Any] = {"name": self.name, "schema": self.schema}
        if self.strict is not None:
            body["strict"] = self.strict
        return {"type": "json_schema", "json_schema": body}

    def check_schema(self) -> None:
        """Refuse a schema that is too long, not a valid JSON Schema, or that cannot be enforced.

        Raises:
            ValueError: naming ``json_schema.schema`` and what is wrong with it.
        """
        schema = self.schema
        if schema is None:
            return
        if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"json_schema.schema must be at most {MAX_SCHEMA_CHARS} characters")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise ValueError(
                f"json_schema.schema is not a valid JSON Schema: {exc.message}"
                + (f" (at {where})" if where else "")
            ) from None
        # The worker would fail the job at run time; refusing it at submit says why sooner.
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            error = llguidance.LLMatcher.validate_grammar(grammar, None)
        except ValueError as exc:
            error = str(exc)
        if error:
            raise ValueError(f"json_schema.schema cannot be enforced: {error}")


def parse_response_format(value: Any) -> ResponseFormat:
    """Return ``value`` (a decoded ``response_format``) as a :class:`ResponseFormat`.

    Raises:
        ValueError: the shape is wrong; the message names the part at fault.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"must be an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        _only(value, {"type"})
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise ValueError(f"type must be text, json_object or json_schema, got {kind!r}")
    _only(value, {"type", "json_schema"})
    body = value.get("json_schema")
    if not isinstance(body, Mapping):
        raise ValueError("json_schema must be an object with name and schema")
    # description is for a model that reads it: accepted, neither used nor stored.
    _only(body, {"name", "description", "schema", "strict"}, where="json_schema")
    name, schema, strict = body.get("name"), body.get("schema", {}), body.get("strict")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise ValueError("json_schema.name must be 1 to 64 letters, digits, _ or -")
    if schema is False:
        raise ValueError("json_schema.schema is false: no document can match it")
    if not isinstance(schema, dict):
        raise ValueError(
            f"json_schema.schema must be a JSON Schema object, got {type(schema).__name__}"
        )
    if strict is not None and not isinstance(strict, bool):
        raise ValueError("json_schema.strict must be a boolean")
    return ResponseFormat("json_schema", name=name, schema=schema, strict=strict)


def _only(value: Mapping[str, Any], allowed: set[str], *, where: str = "") -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise ValueError(f"{prefix}{extra[0]} is not a known parameter")

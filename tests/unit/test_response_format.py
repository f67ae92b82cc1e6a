"""The one model of ``response_format``: parsed at submit, stored, parsed back by the engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from completion_queue import ResponseFormat, ValidationError, parse_response_format
from completion_queue.response_format import MAX_SCHEMA_CHARS
from producer.schema import Limits, validate_request

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("value", "stored", "grammar_schema"),
    [
        ({"type": "text"}, None, None),
        ({"type": "json_object"}, {"type": "json_object"}, {"type": "object"}),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "p", "description": "a person", "schema": SCHEMA},
            },
            {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            SCHEMA,
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "strict": False}},
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "strict": False}},
            {},
        ),
    ],
)
def test_formats_are_normalised_and_read_back_unchanged(
    value: dict[str, Any], stored: dict[str, Any] | None, grammar_schema: dict[str, Any] | None
) -> None:
    parsed = parse_response_format(value)
    parsed.check_schema()

    assert parsed.stored() == stored
    assert parsed.grammar_schema == grammar_schema
    # The worker reads the stored form back as compact JSON: the same format, keys in order
    if stored is not None:
        again = parse_response_format(json.loads(json.dumps(stored, separators=(",", ":"))))
        assert again == parsed
        assert list(again.grammar_schema or {}) == list(grammar_schema or {})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("json", "must be an object, got str"),
        ({"type": "xml"}, "type must be text, json_object or json_schema, got 'xml'"),
        ({}, "type must be text, json_object or json_schema, got None"),
        ({"type": "text", "schema": {}}, "schema is not a known parameter"),
        ({"type": "json_schema"}, "json_schema must be an object with name and schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "x": 1}},
            "json_schema.x is not a known parameter",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {}}},
            "json_schema.name must be 1 to 64 letters, digits, _ or -",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": False}},
            "json_schema.schema is false: no document can match it",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": True}},
            "json_schema.schema must be a JSON Schema object, got bool",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}},
            "json_schema.schema must be a JSON Schema object, got list",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}},
            "json_schema.strict must be a boolean",
        ),
    ],
)
def test_malformed_formats_are_refused_naming_the_part(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_response_format(value)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "objekt"}, "json_schema.schema is not a valid JSON Schema: "),
        ({"type": "array", "uniqueItems": True}, "json_schema.schema cannot be enforced: "),
        (
            {"enum": ["x" * MAX_SCHEMA_CHARS]},
            f"json_schema.schema must be at most {MAX_SCHEMA_CHARS} characters",
        ),
    ],
)
def test_schemas_that_cannot_be_enforced_are_refused(schema: Any, message: str) -> None:
    parsed = parse_response_format(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    with pytest.raises(ValueError) as refused:
        parsed.check_schema()
    assert str(refused.value).startswith(message)


def test_the_producer_reports_the_models_message_under_response_format() -> None:
    # Given a format whose schema is not a valid JSON Schema
    value = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "objekt"}}}
    with pytest.raises(ValueError) as model_error:
        parse_response_format(value).check_schema()

    # When it is submitted
    with pytest.raises(ValidationError) as submitted:
        validate_request({"prompt": "x", "response_format": value}, Limits())

    # Then the producer names the field and says what the model says
    assert submitted.value.field == "response_format"
    assert str(submitted.value) == f"response_format {model_error.value}"


def test_a_stored_format_is_the_normalised_one() -> None:
    value = {
        "type": "json_schema",
        "json_schema": {"name": "p", "description": "d", "schema": SCHEMA, "strict": True},
    }
    request = validate_request({"prompt": "x", "response_format": value}, Limits())
    assert request.params()["response_format"] == parse_response_format(value).stored()
    assert parse_response_format(request.params()["response_format"]) == ResponseFormat(
        "json_schema", name="p", schema=SCHEMA, strict=True
    )

"""The JSON schema the structured-output tests ask for, on either engine."""

from __future__ import annotations

from typing import Any

#: A person: a bounded string, a bounded integer, an enum and a boolean, all required.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
#: A job's ``response_format`` asking for :data:`PERSON`, strictly.
PERSON_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}

"""Protobuf messages as plain JSON values, the one JSON shape of the system: the REST gateway answers
with it and the `fashion` commands print it with `--json`, so a script reads the same fields either way.

Friendlier than protobuf's canonical JSON mapping: field names as in the .proto (snake_case), 64-bit
integers as numbers (not strings), enum values as short lower-case names (JOB_STATE_RUNNING ->
"running"), timestamps as RFC 3339 strings, every field present, unset messages null, and bytes
(images) never echoed back (null).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from functools import cache
from typing import Any

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

_TIMESTAMP = "google.protobuf.Timestamp"


@cache
def _enum_prefix(enum: EnumDescriptor) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_name(enum: EnumDescriptor, number: int) -> str:
    """JobState 2 -> "running" (the enum's name prefix removed, lower case)."""
    value = enum.values_by_number.get(number)
    name = value.name if value is not None else str(number)
    return name.removeprefix(_enum_prefix(enum)).lower()


def enum_number(enum: EnumDescriptor, name: str) -> int:
    """The reverse of enum_name; ValueError names the allowed values."""
    full = _enum_prefix(enum) + name.upper()
    if full not in enum.values_by_name:
        allowed = ", ".join(enum_name(enum, v.number) for v in enum.values if v.number)
        raise ValueError(f"unknown {enum.name} {name!r}; expected one of: {allowed}")
    return enum.values_by_name[full].number


def _timestamp(msg: Message) -> str:
    seconds, nanos = msg.seconds, msg.nanos  # type: ignore[attr-defined]
    return datetime.fromtimestamp(seconds + nanos / 1e9, UTC).isoformat().replace("+00:00", "Z")


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return None
    return value


def to_json(msg: Message) -> Any:
    """A message as plain JSON-ready Python values (every field present, unset messages as None)."""
    desc = msg.DESCRIPTOR
    if desc.full_name == _TIMESTAMP:
        return _timestamp(msg)
    out: dict[str, Any] = {}
    for field in desc.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        elif field.has_presence and field.type != FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def dumps(value: Message | Any) -> str:
    """`value` (a message, or JSON-ready values) as an indented JSON document, as the `fashion`
    commands print it with --json."""
    return json.dumps(to_json(value) if isinstance(value, Message) else value, indent=2, ensure_ascii=False)

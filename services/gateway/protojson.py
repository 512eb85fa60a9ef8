"""Protobuf messages as the gateway's JSON, and the matching pydantic models for the OpenAPI document.

Both are derived from the message descriptors, so the documented schema cannot drift from what is
returned. The JSON is friendlier than protobuf's canonical mapping: 64-bit integers are numbers,
enum values are short lower-case names (JOB_STATE_RUNNING -> "running"), timestamps are RFC 3339
strings and unset messages are null.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, Field, create_model

_TIMESTAMP = "google.protobuf.Timestamp"
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_BOOL = FieldDescriptor.TYPE_BOOL
_STRINGS = {FieldDescriptor.TYPE_STRING}
_BYTES = FieldDescriptor.TYPE_BYTES


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
    if field.type == _BYTES:
        return None  # images are never echoed back
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


def _python_type(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == _TIMESTAMP:
            return str
        return schema(field.message_type)
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = tuple(enum_name(field.enum_type, v.number) for v in field.enum_type.values)
        return Literal[names]  # type: ignore[valid-type]
    if field.type in _FLOATS:
        return float
    if field.type == _BOOL:
        return bool
    if field.type in _STRINGS:
        return str
    if field.type == _BYTES:
        return None
    return int


@cache
def schema(desc: Descriptor) -> type[BaseModel]:
    """A pydantic model describing to_json's output for messages of `desc` (for OpenAPI)."""
    fields: dict[str, Any] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            kind: Any = dict[str, _python_type(field.message_type.fields_by_name["value"])]  # type: ignore[misc]
        elif field.is_repeated:
            kind = list[_python_type(field)]  # type: ignore[misc]
        else:
            kind = _python_type(field)
            nullable = field.type == FieldDescriptor.TYPE_MESSAGE or field.has_presence
            if nullable:
                kind = kind | None
        fields[field.name] = (kind, Field(...))
    return create_model(desc.name, __doc__=f"{desc.file.package} {desc.name}", **fields)

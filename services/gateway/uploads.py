"""Image uploads of the prediction routes: a multipart/form-data body parsed by `multipart` (the
parser of Bottle) into the parts of one form field, held in memory.

Starlette's form parsing (what `UploadFile` parameters use) spools every file into a temporary
file object and builds a FormData, and python-multipart's callback parser under it costs about
five times as much CPU per small upload as `multipart`'s push parser. The body is already limited
by the BodyLimit middleware, so the parts are simply kept as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from services.gateway.errors import ApiError

MAX_PARTS = 4096  # a form with more parts than any batch allows is refused, not parsed to the end


@dataclass(frozen=True)
class Upload:
    """One uploaded file."""

    filename: str
    data: bytes


def _expected(field: str) -> str:
    return f"expected a multipart/form-data body with the image in the form field '{field}'"


def files(body: bytes, content_type: str | None, field: str) -> list[Upload]:
    """The files of `field`, in body order. ApiError 400 when the body is not multipart/form-data,
    is malformed or truncated, or has no part named `field`."""
    ctype, params = parse_options_header(content_type or "")
    boundary = params.get("boundary")
    if ctype != "multipart/form-data" or not boundary:
        raise ApiError(400, f"{_expected(field)} (got Content-Type {content_type or 'none'!r})")
    found: list[Upload] = []
    segment: MultipartSegment | None = None
    chunks: list[bytes] = []
    parts = 0
    try:
        parser = PushMultipartParser(boundary)
        for event in parser.parse(body):
            if isinstance(event, MultipartSegment):
                parts += 1
                if parts > MAX_PARTS:
                    raise ApiError(400, f"more than {MAX_PARTS} parts in one form")
                segment = event
                chunks = []
            elif event:
                chunks.append(event)
            elif segment is not None and segment.name == field:  # None: the end of a part
                found.append(Upload(segment.filename or "", chunks[0] if len(chunks) == 1 else b"".join(chunks)))
    except MultipartError as exc:
        raise ApiError(400, f"malformed multipart/form-data body: {exc}") from None
    try:
        parser.close()  # raises when the body ended before its closing boundary
    except MultipartError:
        raise ApiError(400, "truncated multipart/form-data body: no closing boundary") from None
    if not found:
        raise ApiError(400, f"no form field '{field}': {_expected(field)}")
    return found


def openapi_body(field: str, description: str, many: bool = False) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads `files(...)` itself."""
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: {**schema, "description": description}}}}}}}

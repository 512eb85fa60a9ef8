"""Image uploads of the prediction routes: a multipart/form-data body parsed by python-multipart
into the parts of one form field, held in memory.

Starlette's form parsing (what `UploadFile` parameters use) spools every file into a temporary
file object and builds a FormData; on POST /predict that cost as much gateway CPU as everything
else the request does. The body is already limited by the BodyLimit middleware, so the parts
are simply kept as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

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
    is malformed, or has no part named `field`."""
    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, f"{_expected(field)} (got Content-Type {content_type or 'none'!r})")
    wanted = field.encode()
    found: list[Upload] = []
    header_name = bytearray()
    header_value = bytearray()
    disposition = b""
    chunks: list[bytes] = []
    parts = ended = 0

    def on_part_begin() -> None:
        nonlocal disposition, parts
        parts += 1
        if parts > MAX_PARTS:
            raise ApiError(400, f"more than {MAX_PARTS} parts in one form")
        disposition = b""
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        nonlocal disposition
        if header_name.lower() == b"content-disposition":
            disposition = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        nonlocal ended
        ended += 1
        kind, options = parse_options_header(disposition)
        if kind == b"form-data" and options.get(b"name") == wanted:
            found.append(Upload(options.get(b"filename", b"").decode("utf-8", "replace"), b"".join(chunks)))

    callbacks: Any = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                      "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart/form-data body: {exc}") from None
    if parts > ended:
        raise ApiError(400, "truncated multipart/form-data body: a part has no closing boundary")
    if not found:
        raise ApiError(400, f"no form field '{field}': {_expected(field)}")
    return found


def openapi_body(field: str, description: str, many: bool = False) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads `files(...)` itself."""
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: {**schema, "description": description}}}}}}}

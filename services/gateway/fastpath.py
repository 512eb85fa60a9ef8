"""POST /predict answered below FastAPI's routing, dependency solving and exception middleware.

Those cost the gateway more CPU per prediction than the rest of the request (HTTP parsing, the
multipart body, the gRPC call, the JSON answer), so answered here POST /predict serves markedly
more requests per second (docs/performance.md has the measurements). The route itself stays declared in
routes.py: it documents /predict in the OpenAPI document and serves it when traces are exported
(this middleware is installed only when they are not, so FastAPI's server span is never skipped).
Both call routes.prediction and answer failures with errors.response_for; the token check and
the top_k rule are the route's: tests/gateway run the same assertions through both.

It sits inside the access log, trace context and body limit middleware, so /predict is still
logged, counted, limited and traced into its gRPC call as before.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Annotated, Any
from urllib.parse import parse_qsl

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from services.common.security import TokenSource
from services.gateway import errors, routes
from services.gateway.middleware import ASGIApp, Receive, Scope, Send

ROUTE = SimpleNamespace(path="/predict")  # the route template AccessLog labels metrics with


class PredictFastPath:
    """ASGI middleware answering POST /predict; everything else goes on to the application."""

    def __init__(self, app: ASGIApp, tokens: TokenSource) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = ROUTE
        headers = dict(scope["headers"])
        try:
            if self.tokens.enabled:
                refusal = self.tokens.check(headers.get(b"authorization"))
                if refusal is not None:
                    raise errors.ApiError(401, refusal, headers={"WWW-Authenticate": "Bearer"})
            top_k = _top_k(scope["query_string"])
            body = await _body(receive)
            if body is None:
                return  # the client went away
            content_type = headers.get(b"content-type")
            answer = await routes.prediction(scope["app"].state.backends, body,
                                             content_type.decode("latin-1") if content_type else None,
                                             top_k, own_call=b"traceparent" in headers)
        except Exception as exc:  # the body limit's HTTPException included, raised while reading
            await errors.response_for(exc, "POST", "/predict")(scope, receive, send)
            return
        payload = _json(answer)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _top_k(query: bytes) -> int:
    """The route's `top_k` query parameter, by its rule (an integer, 0 to TOP_K_MAX, 0 by default),
    checked by the route's rule (routes.ascii_digits) and parsed by pydantic as the route's is, so
    both accept and refuse the same values."""
    value = None
    for name, v in parse_qsl(query.decode("latin-1")):
        if name == "top_k":
            value = v
    if value is None:
        return 0
    try:
        return _TOP_K.validate_python(value)
    except ValidationError as exc:
        raise errors.ApiError(400, "; ".join(f"top_k: {e['msg']}" for e in exc.errors())) from None


_TOP_K: TypeAdapter[int] = TypeAdapter(Annotated[int, BeforeValidator(routes.ascii_digits),
                                                  Field(ge=0, le=routes.TOP_K_MAX)])


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# As Starlette's JSONResponse renders it; one encoder for every answer (json.dumps builds one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()

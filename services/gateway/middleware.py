"""ASGI middleware of the gateway: request-body size limits (HTTP 413 before an oversized body is
read) and the access log plus request metrics. Plain ASGI, not BaseHTTPMiddleware: it sits on the
hot path of every prediction."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, propagate
from starlette.exceptions import HTTPException

from services.common import metrics
from services.common.logs import log_line
from services.gateway.errors import is_open_inference

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("gateway.access")


@dataclass(frozen=True)
class Limit:
    bytes: int
    """Largest body accepted."""
    setting: str
    """The setting that sets it, named in the refusal ("": a fixed limit)."""
    shown: int
    """The setting's value (bytes may add room for multipart framing)."""

    def message(self) -> str:
        where = f" (FASHION_{self.setting.upper()})" if self.setting else ""
        return f"request body over the limit of {self.shown} bytes{where}"


def _too_large(limit: Limit, path: str) -> tuple[dict[str, Any], bytes]:
    error: object = {"status": 413, "code": "PAYLOAD_TOO_LARGE", "message": limit.message()}
    if is_open_inference(path):  # that protocol's error body
        error = limit.message()
    body = json.dumps({"error": error})
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, body.encode()


class BodyLimit:
    """Refuses request bodies over the limit of their path (`limits` by path, else the first of
    `prefix_limits` whose prefix the path has, else `default`): at once when Content-Length says
    so, else as soon as the streamed body passes it (an HTTPException raised where the route reads
    the body, answered by the error handlers)."""

    def __init__(self, app: ASGIApp, limits: dict[str, Limit], default: Limit,
                 prefix_limits: dict[str, Limit] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.default = default
        self.prefix_limits = prefix_limits or {}

    def limit_of(self, path: str) -> Limit:
        limit = self.limits.get(path)
        if limit is None:
            limit = next((lim for prefix, lim in self.prefix_limits.items() if path.startswith(prefix)), self.default)
        return limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit.bytes:
                    await self._refuse(send, limit, scope["path"])
                    return
                break
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit.bytes:
                    raise HTTPException(413, limit.message())
            return message

        await self.app(scope, counted_receive, send)

    @staticmethod
    async def _refuse(send: Send, limit: Limit, path: str) -> None:
        start, body = _too_large(limit, path)
        await send(start)
        await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One log line and the request metrics per HTTP request. The route template (not the raw
    path) labels the metrics, so job ids do not multiply series; headers are never logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        metrics.HTTP_IN_FLIGHT.inc()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(template, method, str(status)).inc()
            metrics.HTTP_LATENCY.labels(template, method).observe(elapsed)
            level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
            if access_log.isEnabledFor(level):
                client = scope.get("client")
                peer = f"{client[0]}:{client[1]}" if client else "-"
                log_line(access_log, level, f"method={method} path={scope['path']} status={status} "
                                            f"latency_ms={elapsed * 1000:.2f} peer={peer}")


class TraceContext:
    """Continues the caller's W3C trace (traceparent, tracestate) without recording HTTP spans: the
    gRPC calls made for the request become children of the caller's span, and log lines carry its
    trace id. Used when no trace exporter is configured, where server spans would be pure cost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
                       if name in (b"traceparent", b"tracestate")}
            if carrier:
                token = context.attach(propagate.extract(carrier))
                try:
                    await self.app(scope, receive, send)
                finally:
                    context.detach(token)
                return
        await self.app(scope, receive, send)

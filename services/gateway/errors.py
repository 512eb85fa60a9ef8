"""Every gateway error as JSON: {"error": {"status": 400, "code": "INVALID_ARGUMENT", "message": "..."}};
under /v2 (the Open Inference Protocol) as that protocol has it: {"error": "..."}, which Triton's and
KServe's clients read.

gRPC status codes from the services are mapped to HTTP here and nowhere else (the mapping of
google.rpc.Code to HTTP, except where noted).
"""

from __future__ import annotations

import logging
import re

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,  # e.g. cancelling a finished job: a state conflict
    grpc.StatusCode.OUT_OF_RANGE: 400,
    # The caller was authenticated by the gateway; a service refusing the gateway's own credentials is
    # a gateway misconfiguration the caller cannot fix.
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}
OPEN_INFERENCE_PREFIX = "/v2"
MESSAGE_TOO_LARGE = "message larger than max"
"""In gRPC's RESOURCE_EXHAUSTED details when a message is over a channel's size limit."""
INTERNAL_ADDRESS = re.compile(r"(?:ipv4:|ipv6:|unix:|dns:/*)?(?:\[[0-9A-Fa-f:.%]+\]|%5B[0-9A-Fa-f:.%]+?%5D|"
                              r"[\w-]*[A-Za-z.][\w.-]*):\d{1,5}\b")
"""A host:port (or ipv4:/ipv6:/dns: target) in gRPC's UNAVAILABLE details."""
DISK_FULL = ("No space left on device", "Disk quota exceeded")
"""In RESOURCE_EXHAUSTED details when a service's disk is full (the operating system's words, which the
services quote): HTTP 507, not 429, whose Retry-After would have clients retry every second."""
# HTTP statuses the gateway answers itself, and the code name its body carries.
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
              413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 500: "INTERNAL", 503: "UNAVAILABLE"}


class ErrorDetail(BaseModel):
    status: int
    """The HTTP status code, repeated."""
    code: str
    """gRPC status name (INVALID_ARGUMENT, UNAVAILABLE, ...) or PAYLOAD_TOO_LARGE, ..."""
    message: str
    """What went wrong, for people."""


class ErrorBody(BaseModel):
    error: ErrorDetail


class OpenInferenceError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str
    """What went wrong, for people."""


class ApiError(Exception):
    """An error the gateway answers itself (too large, malformed request, missing token)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.code = code or HTTP_CODES.get(status, "ERROR")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    """The error body of `path`'s API (the Open Inference Protocol's under /v2, else ours)."""
    if is_open_inference(path):
        return JSONResponse({"error": message}, status, headers=headers)
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status, headers=headers)


def is_open_inference(path: str) -> bool:
    return path == OPEN_INFERENCE_PREFIX or path.startswith(OPEN_INFERENCE_PREFIX + "/")


def from_grpc(exc: grpc.RpcError, service: str = "", path: str = "") -> JSONResponse:
    code = exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    status = HTTP_STATUS.get(code, 500)
    details = (exc.details() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None) or str(exc)
    message = details
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and MESSAGE_TOO_LARGE in details:
        # A message over a channel's size limit: retrying cannot help (no 429 and Retry-After).
        status = 413
        message = f"{details}: a gRPC message is over FASHION_MAX_MESSAGE_BYTES; split the request into smaller ones"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(words in details for words in DISK_FULL):
        status = 507  # Insufficient Storage: an operator must make room
    elif code == grpc.StatusCode.UNAVAILABLE and service:
        # The reason without the addresses of the services behind the gateway (the gateway's log has them).
        message = f"{service} service unavailable: {INTERNAL_ADDRESS.sub('<address>', details)}"
    elif status == 502:
        message = f"the {service or 'backend'} service refused the gateway's credentials: {details}"
    if status >= 500:
        log.error("%s call failed: %s %s", service or "gRPC", code.name, details)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return error_response(status, code.name, message, headers, path)


def service_of(path: str) -> str:
    """Which service a gateway path talks to, for error messages."""
    for prefix, service in (("/batch", "Batch"), ("/monitor", "Monitor")):
        if path.startswith(prefix):
            return service
    return "Inference"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def response_for(exc: Exception, method: str, path: str) -> JSONResponse:
    """The JSON error answer to `exc` raised while serving `method` `path`: the one mapping of
    failures to error bodies, for FastAPI's exception handlers and the /predict fast path."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_grpc(exc, service_of(path), path)
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers, path)
    if isinstance(exc, RequestValidationError):
        return error_response(400, "INVALID_ARGUMENT", _validation_message(exc), path=path)
    if isinstance(exc, StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "ERROR")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None), path)
    log.exception("Unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, "INTERNAL", f"internal error ({type(exc).__name__})", path=path)


class UnhandledErrors:
    """ASGI middleware answering any exception a route raises with the JSON 500 body, logged once.

    Starlette's own handler for Exception (ServerErrorMiddleware) re-raises after answering, so that
    uvicorn logs the traceback a second time; this one, inside it, does not re-raise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise  # too late for an error body; the server closes the connection
            await response_for(exc, scope["method"], scope["path"])(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the JSON error body. Call it before adding
    other middleware: UnhandledErrors is then the innermost."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return response_for(exc, request.method, request.url.path)

    for kind in (grpc.aio.AioRpcError, ApiError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
    app.add_middleware(UnhandledErrors)

"""The REST gateway process: FastAPI on uvicorn (uvloop, httptools), talking to the Inference, Batch
and Monitor services over gRPC with the shared client, TLS and token settings.

HTTP side: optional TLS (mutual with FASHION_TLS_CLIENT_CA), optional bearer token on everything
but /health, /healthz and the API docs (/metrics too with FASHION_METRICS_PUBLIC), upload limits,
JSON errors, access log in logs/gateway.log, Prometheus /metrics, and OpenTelemetry spans that continue an incoming
`traceparent` into the gRPC calls (FastAPI's own OpenTelemetry server spans, recorded only when
traces are exported; otherwise the context alone is carried, which costs nothing measurable).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.telemetry import TelemetryConfig
from fastapi_offline import FastAPIOffline

from services import __version__
from services.common import metrics
from services.common.bootstrap import gateway_port, load, observe, refuse_unusable_ports
from services.common.config import GatewaySettings
from services.common.security import TokenSource, tls_enabled
from services.common.tracing import exporting, shutdown_tracing
from services.gateway import errors, routes
from services.gateway.backends import Backends
from services.gateway.fastpath import PredictFastPath
from services.gateway.middleware import AccessLog, BodyLimit, Limit, TraceContext

log = logging.getLogger(__name__)

DOCS_ASSETS = "/docs/assets"
"""Where Swagger UI's script, styles and icon are served (public, as /docs is)."""
UNTRACED_PATHS = frozenset({"/health", "/healthz", "/metrics"})  # probes and scrapes: no spans
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an image of max_upload_bytes
JSON_BODY_LIMIT = 1024 * 1024


# Declares the scheme in the OpenAPI document; the check itself is TokenSource's, as on the gRPC side.
BEARER = HTTPBearer(auto_error=False, description="The token of FASHION_AUTH_TOKEN / FASHION_AUTH_TOKEN_FILE")


def _token_check(tokens: TokenSource):  # type: ignore[no-untyped-def]
    async def require_token(request: Request,
                            _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        refusal = tokens.check(request.headers.get("authorization"))
        if refusal is not None:
            raise errors.ApiError(401, refusal, headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def create_app(settings: GatewaySettings | None = None, trace_http: bool = False) -> FastAPI:
    """The ASGI application. Logging and tracing are set up by the caller (see `factory`).
    `trace_http` records a server span per request; without it the caller's trace context is
    still continued into the gRPC calls."""
    settings = settings or GatewaySettings()
    tokens = TokenSource(settings)
    metrics.expose("gateway")  # its /metrics shows the gateway's own families only

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backends = Backends.connect(settings)
        app.state.trace_http = trace_http
        log.info("Gateway ready: Inference at %s, Batch at %s, Monitor at %s%s", settings.inference_address,
                 settings.batch_address, settings.monitor_address,
                 "; bearer token required" if tokens.enabled else "")
        yield
        await app.state.backends.close()
        shutdown_tracing()  # flush the last spans
        metrics.retire_process()

    # FastAPI's native OpenTelemetry: server spans only (no per-dependency spans, metrics or logs:
    # Prometheus and our log files cover those).
    telemetry: TelemetryConfig = {"tracing": trace_http, "metrics": False, "logs": False, "operation_spans": False,
                                  "exclude": _untraced}
    # Swagger UI's script and styles come from the gateway (fastapi-offline), never from a CDN.
    app = FastAPIOffline(title="Fashion classifier", version=__version__, lifespan=lifespan, redoc_url=None,
                         static_url=DOCS_ASSETS, telemetry=telemetry,
                         description="Classify fashion product photos; run and watch batch sorting jobs; system "
                                     "health. Errors are JSON: {\"error\": {\"status\", \"code\", \"message\"}}.")
    errors.install(app)
    protected = [Depends(_token_check(tokens))] if tokens.enabled else []
    app.include_router(_with_head(routes.public))
    app.include_router(_with_head(routes.metrics), dependencies=[] if settings.metrics_public else protected)
    app.include_router(_with_head(routes.inference_router(settings)), dependencies=protected)
    app.include_router(_with_head(routes.batch_router()), dependencies=protected)
    app.include_router(_with_head(routes.monitor_router()), dependencies=protected)
    app.include_router(_with_head(routes.open_inference_router(settings)), dependencies=protected)
    limits = {
        "/predict": Limit(settings.max_upload_bytes + MULTIPART_OVERHEAD, "max_upload_bytes",
                          settings.max_upload_bytes),
        "/predict/batch": Limit(settings.max_batch_upload_bytes, "max_batch_upload_bytes",
                                settings.max_batch_upload_bytes),
    }
    json_limit = Limit(JSON_BODY_LIMIT, "", JSON_BODY_LIMIT)  # job submissions and the like
    # Open Inference Protocol inference requests (POST /v2/models/{name}[/versions/{v}]/infer)
    tensors = {"/v2/models/": Limit(settings.max_batch_upload_bytes, "max_batch_upload_bytes",
                                    settings.max_batch_upload_bytes)}
    if not trace_http:
        app.add_middleware(PredictFastPath, tokens=tokens)  # innermost of ours: logged, limited, traced
    app.add_middleware(BodyLimit, limits=limits, default=json_limit, prefix_limits=tensors)
    app.add_middleware(AccessLog)  # outside the limit, so refusals are logged and counted
    if not trace_http:
        app.add_middleware(TraceContext)  # outermost: the access log line carries the caller's trace id
    if settings.gateway_cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.gateway_cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type",
                                                                         "traceparent", "tracestate"])
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app


def _with_head(router: APIRouter) -> APIRouter:
    """`router`, with HEAD wherever it has GET (RFC 9110; uptime checkers probe /health so): the GET
    handler runs and uvicorn sends its headers without the body. Left out of the OpenAPI document."""
    for route in router.routes:
        if isinstance(route, APIRoute) and "GET" in route.methods:
            route.methods.add("HEAD")
    return router


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less its 422 answers: invalid requests get a 400 with our error body
    (see errors.install), which every route documents already."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        for operations in schema.get("paths", {}).values():
            operations.pop("head", None)  # HEAD of every GET route: the GET operation documents it
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


def factory() -> FastAPI:
    """What each uvicorn worker runs: logs to logs/gateway.log, tracing (before any channel), the app."""
    settings = GatewaySettings()
    provider = observe(settings, "gateway", "gateway")
    return create_app(settings, trace_http=provider is not None and exporting())


def uvicorn_ssl(settings: GatewaySettings) -> dict[str, object]:
    """uvicorn's TLS arguments from the shared TLS settings (none when TLS is off)."""
    if not tls_enabled(settings):
        return {}
    kwargs: dict[str, object] = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca:
        kwargs.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def main() -> None:
    settings = load(GatewaySettings)  # unusable settings, a bad token file: one line, exit 2, before workers start
    refuse_unusable_ports(settings, [gateway_port(settings)])
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit 0 then, with the logs flushed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if settings.gateway_workers > 1:
        # The workers (fresh interpreters) write prometheus-client's multiprocess files here, and /metrics,
        # whichever worker answers, sums them: one view of the gateway, as with a single process.
        metrics_dir = tempfile.mkdtemp(prefix="fashion-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    uvicorn.run(
        "services.gateway.app:factory", factory=True, host=settings.listen_host(settings.gateway_host),
        port=settings.gateway_port,
        workers=settings.gateway_workers, loop="uvloop", http="httptools", log_config=None, access_log=False,
        server_header=False, limit_concurrency=settings.gateway_max_concurrency or None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s), **uvicorn_ssl(settings),  # type: ignore[arg-type]
    )

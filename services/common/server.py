"""The gRPC server every service runs: server options, the request observer (access log and
metrics), the optional bearer-token check, TLS binding, grpc.health.v1 and reflection. The process
around it (settings, logs, tracing, metrics port, start, readiness, graceful shutdown) is
services.common.bootstrap's."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics, tracing
from services.common.config import CommonSettings
from services.common.logs import CALL_TRACE_ID, log_line
from services.common.security import TokenSource, require_token, server_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes that mean the caller went away rather than that the call failed.
_CALLER_CODES = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


def server_options(settings: CommonSettings, reuse_port: bool = False) -> list[tuple[str, int]]:
    """A server's options: message limits both ways, keepalive (channels to other services take
    theirs from security.client_options); SO_REUSEPORT only with `reuse_port` (several server
    processes on one port: the kernel spreads new connections between them)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if settings.max_connection_age_s > 0:
        # Clients reconnect (and re-resolve DNS) now and then, so new replicas get their share.
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
    return options


class RequestObserver:
    """Logs one line per call (method, status, latency; the trace id comes from the log filter)
    and records the request metrics, by wrapping each method handler once, at registration."""

    def __init__(self, service: str, logger: logging.Logger | None = None) -> None:
        self._service = service
        self._log = logger or logging.getLogger(f"{service}.access")
        self._in_flight = metrics.GRPC_IN_FLIGHT.labels(service)
        self._counters: dict[tuple[str, grpc.StatusCode], metrics.Counter] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` (\"/package.Service/Method\"), observed."""
        latency = metrics.GRPC_LATENCY.labels(self._service, method)
        observe = self._observe

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):  # type: ignore[no-untyped-def]
                start = time.perf_counter()
                code, note = grpc.StatusCode.OK, ""
                peer = context.peer()
                if not tracing.enabled():
                    CALL_TRACE_ID.set(_call_trace_id(context))  # this call's task only
                self._in_flight.inc()
                try:
                    return await inner_uu(request, context)
                except BaseException as exc:
                    code, note = _status_of(exc, context)
                    raise
                finally:
                    self._in_flight.dec()
                    observe(method, context, peer, code, note, time.perf_counter() - start, latency, 1)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer)

        inner_stream = handler.stream_stream or handler.unary_stream or handler.stream_unary

        def counting(requests):  # type: ignore[no-untyped-def]
            async def gen():  # type: ignore[no-untyped-def]
                async for item in requests:
                    counter[0] += 1
                    yield item
            counter = [0]
            return gen(), counter

        async def streaming(request, context):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            code, note = grpc.StatusCode.OK, ""
            # Read now: a stream's `finally` may run after the client has gone and the call is
            # freed, and context.peer() on a freed call segfaults the process.
            peer = context.peer()
            if not tracing.enabled():
                CALL_TRACE_ID.set(_call_trace_id(context))
            counter = [1]
            if handler.request_streaming:
                request, counter = counting(request)
            self._in_flight.inc()
            try:
                if handler.response_streaming:
                    async for response in inner_stream(request, context):
                        yield response
                else:
                    yield await inner_stream(request, context)
            except BaseException as exc:
                code, note = _status_of(exc, context)
                raise
            finally:
                self._in_flight.dec()
                observe(method, context, peer, code, note, time.perf_counter() - start, latency, counter[0])

        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer)

        async def stream_unary(request, context):  # type: ignore[no-untyped-def]
            async for response in streaming(request, context):
                return response

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)

    def _observe(self, method: str, context: grpc.aio.ServicerContext, peer: str, code: grpc.StatusCode,
                 note: str, elapsed: float, latency: metrics.Histogram, messages: int) -> None:
        if code == grpc.StatusCode.OK:
            set_code = context.code()
            if isinstance(set_code, grpc.StatusCode) and set_code != grpc.StatusCode.OK:
                code, note = set_code, context.details() or ""
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = metrics.GRPC_REQUESTS.labels(self._service, method, code.name)
        counter.inc()
        latency.observe(elapsed)
        level = logging.INFO
        if code in _CALLER_CODES:
            level = logging.WARNING
        elif code != grpc.StatusCode.OK:
            level = logging.ERROR
        extra = f" messages={messages}" if messages != 1 else ""
        detail = f' detail="{note}"' if note else ""
        log_line(self._log, level, f"method={method} status={code.name} latency_ms={elapsed * 1000:.2f} "
                                   f"peer={peer}{extra}{detail}")


class ErrorStatuses:
    """Domain errors -> gRPC status codes: raised where detected, translated here, at the
    transport edge only. The message is the exception's own, so it names the problem."""

    def __init__(self, codes: Mapping[type[Exception] | tuple[type[Exception], ...], grpc.StatusCode]) -> None:
        self._codes = list(codes.items())

    def status_for(self, exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
        """The status for a domain error, or None for an unexpected one."""
        for kinds, code in self._codes:
            if isinstance(exc, kinds):
                return code, str(exc)
        return None

    async def call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        """Await `fn()`; a domain error aborts the call with its status."""
        try:
            return await fn()
        except Exception as exc:
            status = self.status_for(exc)
            if status is None:
                raise
            await context.abort(*status)
            raise  # unreachable: abort raises


def _call_trace_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's W3C trace id (traceparent metadata), else a new random one."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            parts = value.split("-")
            if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                return parts[1].lower()
    # Not os.urandom: its syscall releases the GIL on the event loop's thread once per call, and
    # the loop then waits for the engine thread to hand it back. Trace ids need uniqueness, not
    # secrecy (OpenTelemetry's own id generator uses `random` too).
    return f"{random.getrandbits(128):032x}"


def _status_of(exc: BaseException, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # a stream the client stopped reading
        return grpc.StatusCode.CANCELLED, "cancelled by the client"
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code, context.details() or ""
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN, str(exc)
    return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"


Servicers = Iterable[tuple[Callable[[object, object], None], object]]


class _Registrar:
    """Stands in for the server when a generated add_*Servicer_to_server registers a servicer:
    every method handler is wrapped (token check inside, access log and metrics outside) before
    the real server gets it, once at start-up, instead of grpc.aio interceptors that run per call
    (cheaper per call: docs/performance.md)."""

    def __init__(self, server: grpc.aio.Server, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]
                 ) -> None:
        self._server = server
        self._wrap = wrap
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The same handlers come again, by method, in add_registered_method_handlers: wrapped there."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
        self.services.append(service)


def create_server(settings: CommonSettings, service: str, servicers: Servicers, reuse_port: bool = False
                  ) -> tuple[grpc.aio.Server, list[str]]:
    """A grpc.aio server with the shared options and `servicers` registered, each given as
    (generated add_*Servicer_to_server function, servicer): their calls observed and, when a token
    is configured, refused without it (refusals logged and counted like any call). Returns the
    server and the full names of the gRPC services registered ("fashion.v1.InferenceService")."""
    observer = RequestObserver(service)
    tokens = TokenSource(settings)

    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return observer.wrap(method, require_token(handler, tokens) if tokens.enabled else handler)

    server = grpc.aio.server(options=server_options(settings, reuse_port), maximum_concurrent_rpcs=None)
    _reuse_port[id(server)] = reuse_port
    names: list[str] = []
    for add, servicer in servicers:
        registrar = _Registrar(server, wrap)
        add(servicer, registrar)
        if not registrar.services:
            raise RuntimeError(f"{add.__name__} registered nothing by method: regenerate the gRPC code (make proto)")
        names += registrar.services
    return server, names


# Plaintext health-only servers started by bind(), stopped after their main server (stop()).
_health_companions: dict[int, grpc.aio.Server] = {}
_reuse_port: dict[int, bool] = {}  # servers made by create_server with SO_REUSEPORT: their companion too


async def bind(server: grpc.aio.Server, settings: CommonSettings, address: str,
               health_servicer: health.aio.HealthServicer | None = None) -> int:
    """Listen on `address`: TLS when tls_cert and tls_key are set (mutual TLS when tls_client_ca
    is set too), else plaintext. Returns the bound port.

    With TLS and health_port set, grpc.health.v1 alone is also served in plaintext on health_port
    (same statuses), because Kubernetes grpc probes cannot speak TLS."""
    creds = server_credentials(settings)
    if creds is None:
        port = server.add_insecure_port(address)
        log.info("Listening on %s (plaintext%s)", address,
                 ", bearer token required" if TokenSource(settings).enabled else "")
        return port
    port = server.add_secure_port(address, creds)
    log.info("Listening on %s (TLS%s%s)", address, ", client certificates required" if settings.tls_client_ca else "",
             ", bearer token required" if TokenSource(settings).enabled else "")
    if settings.health_port and health_servicer is not None:
        companion = grpc.aio.server(options=server_options(settings, _reuse_port.get(id(server), False)))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, companion)
        host = address.rsplit(":", 1)[0]
        companion.add_insecure_port(f"{host}:{settings.health_port}")
        await companion.start()
        _health_companions[id(server)] = companion
        log.info("grpc.health.v1 also in plaintext on %s:%d (for probes)", host, settings.health_port)
    return port


async def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str],
                                    with_reflection: bool = True) -> health.aio.HealthServicer:
    """Register grpc.health.v1 and (unless turned off) server reflection. Overall ("") and every named
    service start NOT_SERVING (the library's default for "" is SERVING): the caller says when it is ready."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    await set_serving(health_servicer, names, False)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if with_reflection:
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str],
                      serving: bool) -> None:
    """Set the overall ("") and each named service's status together."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *service_names):
        await health_servicer.set(name, status)


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    """Stop `server`, letting in-flight calls finish for up to `grace_s`, then the plaintext health
    server bind() may have started beside it."""
    await server.stop(grace_s)
    _reuse_port.pop(id(server), None)
    companion = _health_companions.pop(id(server), None)
    if companion is not None:
        await companion.stop(0)

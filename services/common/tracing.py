"""OpenTelemetry tracing for every service, configured by the SDK's standard OTEL_* variables.

Spans are made when they have somewhere to go: OTEL_TRACES_EXPORTER (comma-separated; default
"otlp") names `otlp` with an endpoint set (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the protocol is OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, `grpc` by
default as in the Python SDK, or `http/protobuf`), or `console`; or a test adds a span processor.
`none` or OTEL_SDK_DISABLED=true turn it off. The resource follows OTEL_RESOURCE_ATTRIBUTES and
OTEL_SERVICE_NAME, with service.name fashion-<service> and service.version the project's version
where they leave them unset. When tracing is on, gRPC servers and channels are traced by
opentelemetry-instrumentation-grpc (W3C traceparent in and out; health checks and reflection
untraced). When it is off no span is made (spans nobody collects are costly:
docs/performance.md) but outgoing calls still pass on the W3C context they run in. Log lines carry a
trace id either way (see RequestObserver and logs.TraceIdFilter).
"""

from __future__ import annotations

import logging
import os
import urllib.parse

from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer, filters
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from services import __version__

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_UNTRACED = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))
EXPORTERS = ("otlp", "console", "none")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def _exporter_names() -> list[str]:
    return [name.strip().lower() for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if name.strip()]


def _otlp_protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc").strip().lower()


def configuration_problem() -> str | None:
    """What is wrong with the OTEL_* variables this process reads, in one line; None when nothing is."""
    for name in _exporter_names():
        if name not in EXPORTERS:
            return f"OTEL_TRACES_EXPORTER names {name!r}: this service exports to {', '.join(EXPORTERS)}"
    if "otlp" in _exporter_names() and _otlp_protocol() not in OTLP_PROTOCOLS:
        return (f"OTEL_EXPORTER_OTLP_PROTOCOL is {_otlp_protocol()!r}: this service speaks "
                f"{' or '.join(OTLP_PROTOCOLS)}")
    return None


def otlp_endpoint() -> str | None:
    """The OTLP trace endpoint the environment sets, if any."""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def _shown_endpoint(endpoint: str) -> str:
    """The endpoint as logs may show it: scheme, host, port and path, never a user name, password or query."""
    parts = urllib.parse.urlsplit(endpoint)
    if not parts.hostname:
        return "(an endpoint that is not a URL)"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def span_exporters() -> dict[str, SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER asks for, by a description for the log; OTLP only when an
    endpoint is set."""
    names = _exporter_names()
    if "none" in names:
        return {}
    exporters: dict[str, SpanExporter] = {}
    if "otlp" in names and otlp_endpoint():
        where = f"OTLP ({_otlp_protocol()}) to {_shown_endpoint(otlp_endpoint() or '')}"
        if _otlp_protocol() == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporters[where] = HttpExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporters[where] = GrpcExporter()
    if "console" in names:
        exporters["the console"] = ConsoleSpanExporter()
    return exporters


def service_resource(default_name: str) -> Resource:
    """The SDK's resource from OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, with service.name
    `default_name` and service.version this project's version where those leave them unset."""
    resource = Resource({SERVICE_VERSION: __version__}).merge(Resource.create())
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_name}))
    return resource


def exporting() -> bool:
    """Whether spans leave this process (an exporter is configured)."""
    names = _exporter_names()
    return (os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true" and "none" not in names
            and (("otlp" in names and bool(otlp_endpoint())) or "console" in names))


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> TracerProvider | None:
    """Install the tracer provider and the gRPC instrumentation when there is an exporter (or
    `extra_processor`, e.g. a test's in-memory exporter). Call before creating servers or
    channels. Returns the provider, or None when tracing is off."""
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if _provider is None:
        exporters = span_exporters()
        if not exporters and extra_processor is None:
            _propagate_only()
            return None
        _provider = TracerProvider(resource=service_resource(service_name))
        for exporter in exporters.values():
            _provider.add_span_processor(BatchSpanProcessor(exporter))
        if exporters:
            log.info("Exporting traces of %s to %s", _provider.resource.attributes.get(SERVICE_NAME),
                     ", ".join(exporters))
        trace.set_tracer_provider(_provider)
        GrpcAioInstrumentorServer(filter_=_UNTRACED).instrument(tracer_provider=_provider)
        GrpcAioInstrumentorClient(filter_=_UNTRACED).instrument(tracer_provider=_provider)
    if extra_processor is not None:
        _provider.add_span_processor(extra_processor)
    return _provider
_propagating = False


def _propagate_only() -> None:
    """No spans, but outgoing gRPC calls still carry the current W3C context (e.g. a caller's
    traceparent continued by the gateway): the services' channel options add it to each call's
    metadata (call_metadata), where the client instrumentation's interceptor would cost every call
    an intercepted call's extra task and filters, traced or not."""
    global _propagating
    _propagating = True


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The current W3C trace context as gRPC metadata (none when there is none)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def propagating_by_metadata() -> bool:
    """Whether outgoing calls carry the trace context through call_metadata (no spans are made), rather
    than through the client instrumentation (spans exported)."""
    return _propagating and _provider is None


def shutdown_tracing() -> None:
    """Flush pending spans (on service shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def enabled() -> bool:
    """Whether spans are being made."""
    return _provider is not None

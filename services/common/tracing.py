"""OpenTelemetry tracing for every service, configured by the standard OTEL_* variables.

Tracing is on when spans have somewhere to go: OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set (OTLP over gRPC), or a test's span processor.
OTEL_SDK_DISABLED=true turns it off regardless. When it is on, gRPC servers and channels are
traced by opentelemetry-instrumentation-grpc (W3C traceparent in and out; health checks and
reflection untraced). When it is off no span is made (spans nobody collects would cost a large
share of the Inference service's throughput) but outgoing calls still pass on the W3C context they run
in. Log lines carry a trace id either way (see RequestObserver and logs.TraceIdFilter).
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_UNTRACED = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))


def exporting() -> bool:
    """Whether an OTLP trace endpoint is configured."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> TracerProvider | None:
    """Install the tracer provider and the gRPC instrumentation when there is an exporter (or
    `extra_processor`, e.g. a test's in-memory exporter). Call before creating servers or
    channels. Returns the provider, or None when tracing is off."""
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if _provider is None:
        if not exporting() and extra_processor is None:
            _propagate_only()
            return None
        resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
        _provider = TracerProvider(resource=resource)
        if exporting():
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            log.info("Exporting traces over OTLP to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                     or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        trace.set_tracer_provider(_provider)
        GrpcAioInstrumentorServer(filter_=_UNTRACED).instrument(tracer_provider=_provider)
        GrpcAioInstrumentorClient(filter_=_UNTRACED).instrument(tracer_provider=_provider)
    if extra_processor is not None:
        _provider.add_span_processor(extra_processor)
    return _provider


_propagating = False


def _propagate_only() -> None:
    """No spans, but outgoing gRPC calls still carry the current W3C context (e.g. a caller's
    traceparent continued by the gateway): with no SDK installed the API's tracer hands the
    caller's non-recording span through, and the client instrumentation injects it."""
    global _propagating
    if not _propagating:
        GrpcAioInstrumentorClient(filter_=_UNTRACED).instrument()
        _propagating = True


def shutdown_tracing() -> None:
    """Flush pending spans (on service shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def enabled() -> bool:
    """Whether spans are being made."""
    return _provider is not None

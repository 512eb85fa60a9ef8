"""OpenTelemetry tracing for every service, configured by the standard OTEL_* variables.

Spans are always created (so log lines carry trace ids and W3C context flows between
services); they are exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set. OTEL_SDK_DISABLED=true turns tracing off.
gRPC servers and channels are traced by opentelemetry-instrumentation-grpc; health checks and
reflection are not traced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_UNTRACED = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> TracerProvider | None:
    """Install the tracer provider and the gRPC instrumentation. Call before creating servers or
    channels. `extra_processor` lets tests attach an in-memory exporter."""
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if _provider is None:
        resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
        _provider = TracerProvider(resource=resource)
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
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


def shutdown_tracing() -> None:
    """Flush pending spans (on service shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


@contextmanager
def span(tracer_: trace.Tracer, name: str, **attributes: object) -> Iterator[trace.Span]:
    with tracer_.start_as_current_span(name, attributes=attributes) as s:  # type: ignore[arg-type]
        yield s

"""Traces leave the service over OTLP to a real in-test collector, continuing the caller's trace."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from fashion.client import InferenceClient
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import free_port, health_status


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []  # (name, trace id, parent span id)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append((s.name, s.trace_id.hex(), s.parent_span_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()


def test_classify_spans_reach_the_otlp_collector(tmp_path: Path, linear_model) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    svc = start_inference(tmp_path, linear_model[0], OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                          OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_BSP_SCHEDULE_DELAY="100")
    try:
        svc.wait_serving()
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = "00f067aa0ba902b7"
        x, _ = fashion_images(1)
        with grpc.insecure_channel(svc.address) as ch:
            from fashion.v1 import inference_pb2, inference_pb2_grpc

            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            stub.Classify(inference_pb2.ClassifyRequest(image=encode(x[0])),
                          metadata=[("traceparent", f"00-{trace_id}-{parent}-01")], timeout=10)
        for _ in range(5):
            health_status(svc.address)
        with InferenceClient(svc.address) as client:
            client.classify_batch([encode(x[0])] * 3)
        deadline = time.monotonic() + 20
        wanted = {"/fashion.v1.InferenceService/Classify", "decode", "queue_wait", "inference"}
        batch_span = "/fashion.v1.InferenceService/ClassifyBatch"
        while time.monotonic() < deadline:
            with collector.lock:
                names = {n for n, t, _ in collector.spans if t == trace_id}
                batch_seen = any(n == batch_span for n, _, _ in collector.spans)
            if wanted <= names and batch_seen:
                break
            time.sleep(0.2)
        with collector.lock:
            spans = list(collector.spans)
        ours = [(n, p) for n, t, p in spans if t == trace_id]
        assert wanted <= {n for n, _ in ours}, spans
        server_span_parent = next(p for n, p in ours if n == "/fashion.v1.InferenceService/Classify")
        assert server_span_parent == parent, "the server span continues the caller's W3C trace"
        assert not any("Health" in n for n, _, _ in spans), "health checks are not traced"
        assert any(n == batch_span for n, _, _ in spans)
    finally:
        svc.terminate()
        server.stop(0)

"""Traces leave the service over OTLP to a real in-test collector, continuing the caller's trace."""

from __future__ import annotations

from pathlib import Path

import grpc

from fashion.client import InferenceClient
from fashion.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import OtlpCollector, health_status


def test_classify_spans_reach_the_otlp_collector(tmp_path: Path, linear_model) -> None:
    collector = OtlpCollector()
    svc = start_inference(tmp_path, linear_model[0], **collector.env)
    try:
        svc.wait_serving()
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = "00f067aa0ba902b7"
        x, _ = fashion_images(1)
        with grpc.insecure_channel(svc.address) as ch:
            inference_pb2_grpc.InferenceServiceStub(ch).Classify(
                inference_pb2.ClassifyRequest(image=encode(x[0])),
                metadata=[("traceparent", f"00-{trace_id}-{parent}-01")], timeout=10)
        for _ in range(5):
            health_status(svc.address)
        with InferenceClient(svc.address) as client:
            client.classify_batch([encode(x[0])] * 3)
        wanted = {"/fashion.v1.InferenceService/Classify", "decode", "queue_wait", "inference"}
        batch_span = "/fashion.v1.InferenceService/ClassifyBatch"
        spans = collector.wait_for(lambda spans: wanted <= {n for n, t, _ in spans if t == trace_id}
                                   and any(n == batch_span for n, _, _ in spans))
        ours = [(n, p) for n, t, p in spans if t == trace_id]
        assert wanted <= {n for n, _ in ours}, spans
        server_span_parent = next(p for n, p in ours if n == "/fashion.v1.InferenceService/Classify")
        assert server_span_parent == parent, "the server span continues the caller's W3C trace"
        assert not any("Health" in n for n, _, _ in spans), "health checks are not traced"
        assert any(n == batch_span for n, _, _ in spans)
    finally:
        svc.terminate()
        collector.stop()

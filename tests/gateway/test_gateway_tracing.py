"""A trace continues from the HTTP caller's traceparent through the gateway into the Inference service."""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tests.conftest import start_inference
from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.inference.test_tracing import Collector
from tests.support import free_port


def test_traceparent_flows_from_http_into_grpc(tmp_path: Path, linear_model) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100"}
    inference = start_inference(tmp_path / "inference", linear_model[0], **otel)
    gw = start_gateway(tmp_path / "gateway", inference.address, **otel)
    try:
        inference.wait_serving()
        gw.wait_ready()
        trace_id, parent = "5af7183fb1d4cf5f3a9c1e0b2d4f6a8c", "b7ad6b7169203331"
        x, _ = fashion_images(1)
        resp = httpx.post(f"{gw.url}/predict", files={"file": ("a.png", encode(x[0]))}, timeout=30,
                          headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 20
        wanted = {"POST /predict", "/fashion.v1.InferenceService/Classify", "inference"}
        while time.monotonic() < deadline:
            with collector.lock:
                names = {n for n, t, _ in collector.spans if t == trace_id}
            if wanted <= names:
                break
            time.sleep(0.2)
        with collector.lock:
            ours = [(n, p) for n, t, p in collector.spans if t == trace_id]
        assert wanted <= {n for n, _ in ours}, ours
        # The gateway's server span is the caller's child; the gRPC calls hang below it.
        assert (("POST /predict", parent)) in ours
    finally:
        gw.terminate()
        inference.terminate()
        server.stop(0)

"""A trace continues from the HTTP caller's traceparent through the gateway into the Inference service."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import start_inference
from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.support import OtlpCollector


def test_traceparent_flows_from_http_into_grpc(tmp_path: Path, linear_model) -> None:
    collector = OtlpCollector()
    otel = collector.env
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
        wanted = {"POST /predict", "/fashion.v1.InferenceService/Classify", "inference"}
        spans = collector.wait_for(lambda spans: wanted <= {n for n, t, _ in spans if t == trace_id})
        ours = [(n, p) for n, t, p in spans if t == trace_id]
        assert wanted <= {n for n, _ in ours}, ours
        # The gateway's server span is the caller's child; the gRPC calls hang below it.
        assert (("POST /predict", parent)) in ours
    finally:
        gw.terminate()
        inference.terminate()
        collector.stop()


def test_credentials_in_the_otlp_endpoint_never_reach_the_logs(tmp_path: Path, linear_model) -> None:
    """A collector behind basic auth (http://user:password@host:port): the start line names where traces go
    without the user name and password."""
    collector = OtlpCollector()
    endpoint = collector.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    with_credentials = endpoint.replace("http://", "http://tracer:otlpSECRET@")
    inference = start_inference(tmp_path / "inference", linear_model[0],
                                **{**collector.env, "OTEL_EXPORTER_OTLP_ENDPOINT": with_credentials})
    try:
        inference.wait_serving()
        output = inference.output() + "".join(p.read_text() for p in (tmp_path / "inference").rglob("*.log"))
        assert f"to OTLP (grpc) to {endpoint}" in output, output
        assert "otlpSECRET" not in output and "tracer:" not in output
    finally:
        inference.terminate()
        collector.stop()

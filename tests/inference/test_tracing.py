"""Traces leave the service over OTLP to a real in-test collector, continuing the caller's trace."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc

from fashion.client import InferenceClient
from fashion.v1 import inference_pb2, inference_pb2_grpc
from services import __version__
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import OtlpCollector, OtlpHttpCollector, health_status


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


def test_json_log_lines_carry_the_trace_and_span_of_a_traced_call(tmp_path: Path, linear_model) -> None:
    collector = OtlpCollector()
    svc = start_inference(tmp_path, linear_model[0], FASHION_LOG_FORMAT="json", **collector.env)
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    try:
        svc.wait_serving()
        x, _ = fashion_images(1)
        with grpc.insecure_channel(svc.address) as ch:
            inference_pb2_grpc.InferenceServiceStub(ch).Classify(
                inference_pb2.ClassifyRequest(image=encode(x[0])),
                metadata=[("traceparent", f"00-{trace_id}-{parent}-01")], timeout=10)
        method = "/fashion.v1.InferenceService/Classify"
        collector.wait_for(lambda spans: (method, trace_id, parent) in spans)
        span_id = collector.span_ids[(method, trace_id)]
        deadline = time.monotonic() + 10
        while not (ours := _json_lines_of(tmp_path / "logs" / "api.log", trace_id)):
            assert time.monotonic() < deadline, (tmp_path / "logs" / "api.log").read_text()
            time.sleep(0.05)
    finally:
        svc.terminate()
        collector.stop()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "api.log").read_text().splitlines()]
    assert all({"time", "level", "logger", "message", "trace_id", "span_id", "service"} <= set(x) for x in lines)
    assert all(x["service"] == "inference" and x["time"].endswith("Z") for x in lines)
    access = next(x for x in ours if "Classify" in x["message"])
    assert access["span_id"] == span_id and access["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access["time"])
    started = next(x for x in lines if "SERVING" in x["message"])
    assert started["trace_id"] is None and started["span_id"] is None


def _json_lines_of(path: Path, trace_id: str) -> list[dict]:
    if not path.exists():
        return []
    return [record for line in path.read_text().splitlines()
            if (record := json.loads(line)).get("trace_id") == trace_id]


def test_containers_log_to_stdout_only(tmp_path: Path, linear_model) -> None:
    svc = start_inference(tmp_path, linear_model[0], FASHION_LOG_FILES="false", OTEL_SDK_DISABLED="true")
    try:
        svc.wait_serving()
    finally:
        svc.terminate()
    assert not list((tmp_path / "logs").glob("api*.log")), "no service log files"
    assert "Inference service SERVING" in svc.output()


def _classify_traced(address: str, trace_id: str) -> None:
    x, _ = fashion_images(1)
    with grpc.insecure_channel(address) as ch:
        inference_pb2_grpc.InferenceServiceStub(ch).Classify(
            inference_pb2.ClassifyRequest(image=encode(x[0])),
            metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")], timeout=10)


def test_the_resource_follows_the_sdk_environment(tmp_path: Path, linear_model) -> None:
    collector = OtlpCollector()
    svc = start_inference(tmp_path, linear_model[0], OTEL_RESOURCE_ATTRIBUTES="service.name=shop-inference,"
                          "deployment.environment=staging", **collector.env)
    try:
        svc.wait_serving()
        _classify_traced(svc.address, "1" * 32)
        collector.wait_for(lambda spans: any(t == "1" * 32 for _, t, _ in spans))
    finally:
        svc.terminate()
        collector.stop()
    resource = collector.resources[0]
    assert resource["service.name"] == "shop-inference", resource  # not overridden by ours
    assert resource["service.version"] == __version__ and resource["deployment.environment"] == "staging"


def test_otlp_over_http_protobuf(tmp_path: Path, linear_model) -> None:
    collector = OtlpHttpCollector()
    svc = start_inference(tmp_path, linear_model[0], OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                          OTEL_SERVICE_NAME="classifier", **collector.env)
    try:
        svc.wait_serving()
        _classify_traced(svc.address, "2" * 32)
        spans = collector.wait_for(lambda spans: any(t == "2" * 32 for _, t, _ in spans))
    finally:
        svc.terminate()
        collector.stop()
    assert ("/fashion.v1.InferenceService/Classify", "2" * 32, "00f067aa0ba902b7") in spans
    assert collector.resources[0]["service.name"] == "classifier"
    assert collector.resources[0]["service.version"] == __version__


def test_exporter_none_exports_nothing(tmp_path: Path, linear_model) -> None:
    collector = OtlpCollector()
    svc = start_inference(tmp_path, linear_model[0], OTEL_TRACES_EXPORTER="none", **collector.env)
    try:
        svc.wait_serving()
        _classify_traced(svc.address, "3" * 32)
    finally:
        assert svc.terminate() == 0  # a running exporter flushes its spans on the way out
        collector.stop()
    assert collector.snapshot() == []


def test_unusable_otel_variables_stop_the_service_in_one_line(tmp_path: Path, linear_model) -> None:
    for variable, value, words in (("OTEL_TRACES_EXPORTER", "zipkin", "OTEL_TRACES_EXPORTER names 'zipkin'"),
                                   ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc or http/protobuf")):
        svc = start_inference(tmp_path / variable, linear_model[0], **{variable: value})
        assert svc.proc.wait(timeout=60) == 2
        errors = [line for line in svc.output().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in svc.output(), svc.output()

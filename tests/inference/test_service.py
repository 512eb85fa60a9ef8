"""The Inference service through real gRPC channels on real ports (server in its own process)."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from fashion.client import InferenceClient
from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from services.inference.engine import choose_providers
from services.inference.imaging import Preprocessor
from tests.images import encode, fashion_images, png_declaring
from tests.support import linear_expected

PRE = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))  # the fixture model's manifest


def expected_probs(wb: np.ndarray, images: list[bytes]) -> np.ndarray:
    return linear_expected(wb, np.stack([PRE(img) for img in images]))


def test_classify_returns_the_models_answer_for_real_images(inference_server, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(8)
    images = [encode(img) for img in x]
    want = expected_probs(wb, images)
    with InferenceClient(inference_server.address) as client:
        for img, probs in zip(images, want, strict=True):
            r = client.classify(img, top_k=3)
            assert r.category == r.top_k[0].label
            assert [c.index for c in r.top_k] == list(np.argsort(-probs)[:3])
            np.testing.assert_allclose([c.confidence for c in r.top_k], np.sort(probs)[::-1][:3], rtol=1e-4)
            assert r.model_name == "linear-test" and r.model_version == "7"
            assert r.latency_ms > 0
            assert r.uncertain == (r.confidence < 0.3)


def test_classify_product_photo_jpeg(inference_server) -> None:
    from services.inference import fashion_mnist

    x, _ = fashion_images(1)
    photo = fashion_mnist.render_product_photo(x[0], np.random.default_rng(0))
    with InferenceClient(inference_server.address) as client:
        r = client.classify(photo, top_k=10)
    assert len(r.top_k) == 10
    assert abs(sum(c.confidence for c in r.top_k) - 1) < 1e-4


def test_classify_batch_fails_only_the_bad_image(inference_server, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(4)
    good = [encode(img) for img in x]
    batch = [good[0], good[1], b"this is not an image", good[2], b"", good[3]]
    with InferenceClient(inference_server.address) as client:
        resp = client.classify_batch(batch, top_k=2)
    assert len(resp.results) == 6
    assert [r.request_id for r in resp.results] == [str(i) for i in range(6)]
    bad = {2: "not an image", 4: "empty"}
    want = iter(expected_probs(wb, good))
    for i, r in enumerate(resp.results):
        if i in bad:
            assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert bad[i] in r.error.message
            assert not r.category
        else:
            assert not r.HasField("error")
            assert r.top_k[0].index == int(np.argmax(next(want)))


def test_classify_stream_answers_every_message_in_order(inference_server, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(150)
    images = [encode(img) for img in x]
    want = expected_probs(wb, images).argmax(axis=1)

    def requests():
        for i, img in enumerate(images):
            yield pb.ClassifyRequest(image=img if i != 77 else b"junk", request_id=f"r{i}")

    with InferenceClient(inference_server.address) as client:
        responses = list(client.classify_stream(requests()))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(150)]
    assert "not an image" in responses[77].error.message
    got = [r.top_k[0].index for i, r in enumerate(responses) if i != 77]
    assert got == [int(w) for i, w in enumerate(want) if i != 77]


def test_64_concurrent_clients_each_get_their_own_answer(inference_server, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(64 * 4)
    images = [encode(img) for img in x]
    want = expected_probs(wb, images)

    def client_work(i: int) -> list[tuple[int, np.ndarray]]:
        out = []
        with InferenceClient(inference_server.address) as client:
            for j in range(i * 4, i * 4 + 4):
                r = client.classify(images[j], top_k=10)
                probs = np.zeros(10)
                for c in r.top_k:
                    probs[c.index] = c.confidence
                out.append((j, probs))
        return out

    with ThreadPoolExecutor(64) as pool:
        results = [item for part in pool.map(client_work, range(64)) for item in part]
    assert len(results) == 256
    for j, probs in results:
        np.testing.assert_allclose(probs, want[j], rtol=1e-4, atol=1e-6)


BAD_INPUTS = {
    "random bytes": (np.random.default_rng(0).bytes(5000), "not an image"),
    "zero bytes": (b"", "empty"),
    "png declaring 30000x30000": (png_declaring(30000, 30000), "too many pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(inference_server, name: str) -> None:
    data, reason = BAD_INPUTS[name]
    x, _ = fashion_images(1)
    with InferenceClient(inference_server.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(data)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in err.value.details()
        assert client.classify(encode(x[0])).category  # still serving


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_invalid_argument(inference_server, fmt: str) -> None:
    x, _ = fashion_images(1)
    big = np.kron(x[0], np.ones((12, 12), np.uint8))
    data = encode(big, fmt)
    with InferenceClient(inference_server.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(data[: len(data) // 2])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "truncated" in err.value.details() or "corrupt" in err.value.details()
        assert client.classify(encode(x[0])).category


def test_message_over_the_limit_is_resource_exhausted(inference_server) -> None:
    x, _ = fashion_images(1)
    # Our client allows 64 MiB so that the server's 16 MiB limit is what refuses the message.
    with grpc.insecure_channel(inference_server.address,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(image=b"\xff" * (17 << 20)), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Classify(pb.ClassifyRequest(image=encode(x[0])), timeout=10).category


def test_client_channel_limit_refuses_oversized_requests_locally(inference_server) -> None:
    with InferenceClient(inference_server.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(b"\x00" * (17 << 20))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_model_info_and_stats(inference_server) -> None:
    with InferenceClient(inference_server.address) as client:
        before = client.stats()
        x, _ = fashion_images(1)
        client.classify(encode(x[0]))
        with pytest.raises(grpc.RpcError):
            client.classify(b"nope")
        after = client.stats()
        info = client.model_info()
    assert info.name == "linear-test" and len(info.labels) == 10
    assert list(info.input.shape) == [-1, 1, 28, 28] and info.input.layout == "NCHW"
    assert info.execution_provider == choose_providers("auto")[0]  # CUDA where onnxruntime-gpu has a GPU
    assert after.total_requests - before.total_requests == 2
    assert after.successful_predictions - before.successful_predictions == 1
    assert after.failed_predictions - before.failed_predictions == 1
    assert after.model_loaded and after.classes == 10
    processed = after.successful_predictions + after.failed_predictions
    assert after.success_rate == pytest.approx(round(100 * after.successful_predictions / processed, 2))
    assert after.uptime_human.count(":") == 2


def test_reflection_lists_the_services(inference_server) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(inference_server.address) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        db = ProtoReflectionDescriptorDatabase(ch)
        file = db.FindFileContainingSymbol("fashion.v1.InferenceService")
    assert {"fashion.v1.InferenceService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert file.package == "fashion.v1"


def test_prometheus_metrics_are_exposed(inference_server) -> None:
    x, _ = fashion_images(1)
    with InferenceClient(inference_server.address) as client:
        client.classify(encode(x[0]))
    port = inference_server.env["FASHION_INFERENCE_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("fashion_grpc_requests_total", "fashion_grpc_request_duration_seconds_bucket",
                 "fashion_inference_batch_size_bucket", "fashion_inference_queue_depth",
                 "fashion_inference_images_total", "fashion_inference_model_loaded",
                 "fashion_inference_queue_duration_seconds_bucket", "fashion_inference_compute_duration_seconds"):
        assert name in body, name
    assert 'method="/fashion.v1.InferenceService/Classify"' in body
    assert 'fashion_inference_model_loaded{model="linear-test"} 1.0' in body


def test_request_log_lines(inference_server) -> None:
    log_dir = Path(inference_server.log_path).parent / "logs"
    api = (log_dir / "api.log").read_text()
    errors = (log_dir / "api_errors.log").read_text()
    ok_line = next(line for line in api.splitlines() if "InferenceService/Classify status=OK" in line)
    assert "latency_ms=" in ok_line and "INFO" in ok_line
    trace_id = ok_line.split("trace_id=")[1].split("]")[0]
    assert len(trace_id) == 32 and int(trace_id, 16)
    assert "status=INVALID_ARGUMENT" in errors and "ERROR" in errors
    assert "status=OK" not in errors


def test_log_lines_carry_the_callers_trace_id(inference_server) -> None:
    x, _ = fashion_images(1)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with grpc.insecure_channel(inference_server.address) as ch:
        pb_grpc.InferenceServiceStub(ch).Classify(
            pb.ClassifyRequest(image=encode(x[0])), timeout=10,
            metadata=[("traceparent", f"00-{trace_id}-b7ad6b7169203331-01")])
    api = Path(inference_server.log_path).parent / "logs" / "api.log"
    deadline = time.monotonic() + 5
    while trace_id not in api.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in api.read_text().splitlines() if trace_id in line)
    assert "InferenceService/Classify status=OK" in line


def test_cli_classify_as_a_user_runs_it(inference_server, tmp_path: Path) -> None:
    import subprocess
    import sys

    x, _ = fashion_images(3)
    files = []
    for i, img in enumerate(x):
        path = tmp_path / f"item{i}.png"
        path.write_bytes(encode(img))
        files.append(str(path))
    fashion = Path(sys.executable).parent / "fashion"
    env = {**os.environ, "FASHION_INFERENCE_ADDRESS": inference_server.address}
    out = subprocess.run([str(fashion), "classify", "--json", *files], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in rows] == files
    assert all(r["category"] and 0 < r["confidence"] <= 1 for r in rows)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    out = subprocess.run([str(fashion), "classify", str(bad)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "not an image" in out.stdout
    out = subprocess.run([str(fashion), "classify", "--json", files[0], str(tmp_path), files[1]], capture_output=True,
                         text=True, env=env, timeout=60)
    first, folder, second = [json.loads(line) for line in out.stdout.splitlines()]  # in the order given
    assert out.returncode == 1 and "a folder: name its images" in folder["error"]
    assert (first["file"], second["file"]) == (files[0], files[1]) and first["category"] and second["category"]

"""The REST gateway over real HTTP (uvicorn in its own process) in front of a real Inference service."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime

import httpx
import numpy as np
import pytest

import services
from services.inference.imaging import Preprocessor
from tests.gateway.conftest import GatewayProcess, start_gateway
from tests.images import encode, fashion_images
from tests.support import free_port, linear_expected

PRE = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))  # the fixture model's manifest
SEED_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")  # "2025-10-07T12:00:00"


def images(n: int) -> list[bytes]:
    x, _ = fashion_images(n)
    return [encode(img) for img in x]


def assert_error(resp: httpx.Response, status: int, code: str, words: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["status"] == status and error["code"] == code, error
    assert words in error["message"], error


def test_health_is_the_seeds_json(gateway: GatewayProcess) -> None:
    resp = httpx.get(f"{gateway.url}/health")
    assert resp.status_code == 200
    body = resp.json()
    assert list(body) == ["status", "model_loaded", "classes", "timestamp"]
    assert body["status"] == "healthy" and body["model_loaded"] is True and body["classes"] == 10
    assert SEED_TIMESTAMP.match(body["timestamp"])
    assert abs((datetime.fromisoformat(body["timestamp"]) - datetime.now()).total_seconds()) < 60


def test_stats_is_the_seeds_json_and_counts_predictions(gateway: GatewayProcess) -> None:
    before = httpx.get(f"{gateway.url}/stats").json()
    assert list(before) == ["uptime_seconds", "uptime_human", "total_requests", "total_images_processed",
                            "successful_predictions", "failed_predictions", "success_rate", "model_loaded",
                            "timestamp"]
    types = {"uptime_seconds": int, "uptime_human": str, "total_requests": int, "total_images_processed": int,
             "successful_predictions": int, "failed_predictions": int, "success_rate": float, "model_loaded": bool,
             "timestamp": str}
    for name, kind in types.items():
        assert type(before[name]) is kind, (name, before[name])
    assert SEED_TIMESTAMP.match(before["timestamp"])
    good = images(2)
    for img in good:
        assert httpx.post(f"{gateway.url}/predict", files={"file": ("a.png", img)}).status_code == 200
    assert httpx.post(f"{gateway.url}/predict", files={"file": ("b.png", b"not an image")}).status_code == 400

    async def burst() -> list[int]:  # arriving together, these reach Inference in shared calls
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            answers = await asyncio.gather(*(client.post("/predict", files={"file": ("c.png", img)})
                                             for img in images(24)))
        return [r.status_code for r in answers]

    assert asyncio.run(burst()) == [200] * 24
    after = httpx.get(f"{gateway.url}/stats").json()
    assert after["total_requests"] - before["total_requests"] == 27  # one per HTTP request, shared call or not
    assert after["successful_predictions"] - before["successful_predictions"] == 26
    assert after["failed_predictions"] - before["failed_predictions"] == 1
    assert after["uptime_seconds"] >= before["uptime_seconds"]


def test_predict_returns_the_models_answer(gateway: GatewayProcess, linear_model) -> None:
    _, wb = linear_model
    imgs = images(6)
    want = linear_expected(wb, np.stack([PRE(img) for img in imgs]))
    with httpx.Client(base_url=gateway.url) as client:
        for i, (img, probs) in enumerate(zip(imgs, want, strict=True)):
            resp = client.post("/predict", files={"file": (f"item{i}.png", img, "image/png")},
                               params={"top_k": 3})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["filename"] == f"item{i}.png"
            assert [c["index"] for c in body["top_k"]] == list(np.argsort(-probs)[:3])
            np.testing.assert_allclose([c["confidence"] for c in body["top_k"]], np.sort(probs)[::-1][:3],
                                       rtol=1e-4)
            assert body["category"] == body["top_k"][0]["label"]
            assert body["confidence"] == pytest.approx(float(probs.max()), rel=1e-4)
            assert body["model_name"] == "linear-test" and body["model_version"] == "7"
            assert body["uncertain"] == (body["confidence"] < 0.3)


def test_predict_batch_fails_only_the_bad_image(gateway: GatewayProcess, linear_model) -> None:
    _, wb = linear_model
    good = images(3)
    files = [("files", ("0.png", good[0])), ("files", ("bad.txt", b"hello")), ("files", ("1.png", good[1])),
             ("files", ("empty.png", b"")), ("files", ("2.png", good[2]))]
    resp = httpx.post(f"{gateway.url}/predict/batch", files=files, params={"top_k": 2})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["filename"] for r in results] == ["0.png", "bad.txt", "1.png", "empty.png", "2.png"]
    want = iter(linear_expected(wb, np.stack([PRE(img) for img in good])))
    for r in results:
        if r["filename"] in ("bad.txt", "empty.png"):
            assert r["error"]["status"] == 400 and r["error"]["code"] == "INVALID_ARGUMENT"
            assert r["error"]["message"]
        else:
            assert r.get("error") is None
            assert len(r["top_k"]) == 2 and r["top_k"][0]["index"] == int(np.argmax(next(want)))


def test_bad_requests_get_clear_json_errors_and_the_gateway_keeps_serving(gateway: GatewayProcess) -> None:
    url = gateway.url
    assert_error(httpx.post(f"{url}/predict", files={"file": ("x.png", b"definitely not an image")}),
                 400, "INVALID_ARGUMENT", "not an image")
    assert_error(httpx.post(f"{url}/predict", files={"file": ("x.png", b"")}), 400, "INVALID_ARGUMENT", "empty")
    assert_error(httpx.post(f"{url}/predict", files={"other": ("x.png", images(1)[0])}), 400, "INVALID_ARGUMENT",
                 "file")
    assert_error(httpx.post(f"{url}/predict", content=b"raw", headers={"content-type": "image/png"}), 400,
                 "INVALID_ARGUMENT", "file")
    assert_error(httpx.post(f"{url}/predict", content=b"no parts here",
                            headers={"content-type": "multipart/form-data; boundary=zz"}), 400, "INVALID_ARGUMENT",
                 "multipart")
    assert_error(httpx.post(f"{url}/predict", content=b'--zz\r\nContent-Disposition: form-data; name="file"\r\n\r\nab',
                            headers={"content-type": "multipart/form-data; boundary=zz"}), 400, "INVALID_ARGUMENT",
                 "truncated")
    assert_error(httpx.post(f"{url}/predict", params={"top_k": -1}, files={"file": ("x.png", images(1)[0])}),
                 400, "INVALID_ARGUMENT", "top_k")
    # Over FASHION_MAX_UPLOAD_BYTES (64 KiB here): refused from Content-Length, before reading the body ...
    big = b"\0" * 200_000
    assert_error(httpx.post(f"{url}/predict", files={"file": ("big.png", big)}), 413, "PAYLOAD_TOO_LARGE",
                 "FASHION_MAX_UPLOAD_BYTES")

    # ... and while streaming a body sent without Content-Length (chunked).
    def chunks():  # type: ignore[no-untyped-def]
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        yield boundary
        for _ in range(20):
            yield b"\0" * 16384
        yield b"\r\n--b--\r\n"

    resp = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(resp, 413, "PAYLOAD_TOO_LARGE", "65536")
    too_many = [("files", (f"{i}.png", b"x")) for i in range(9)]
    assert_error(httpx.post(f"{url}/predict/batch", files=too_many), 400, "INVALID_ARGUMENT", "at most 8")
    assert_error(httpx.get(f"{url}/no/such/route"), 404, "NOT_FOUND", "Not Found")
    assert_error(httpx.get(f"{url}/batch/jobs", params={"state": "sleeping"}), 400, "INVALID_ARGUMENT", "running")
    # Still serving.
    assert httpx.post(f"{url}/predict", files={"file": ("ok.png", images(1)[0])}).status_code == 200


def test_openapi_and_metrics(gateway: GatewayProcess) -> None:
    doc = httpx.get(f"{gateway.url}/openapi.json").json()
    assert doc["info"]["version"] == services.__version__  # the project's one version
    for path in ("/health", "/stats", "/predict", "/predict/batch", "/batch/jobs", "/batch/jobs/{job_id}",
                 "/batch/jobs/{job_id}/cancel", "/monitor/health", "/monitor/batch-health", "/metrics"):
        assert path in doc["paths"], path
    predict = doc["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"200", "400", "413", "503"} <= set(predict["responses"])
    # Invalid requests are answered 400 with the error body, so no route documents FastAPI's 422.
    assert not [(p, m) for p, ops in doc["paths"].items() for m, op in ops.items() if "422" in op["responses"]]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(doc["components"]["schemas"]["Health"]["properties"]) == {"status", "model_loaded", "classes",
                                                                          "timestamp"}
    httpx.post(f"{gateway.url}/predict", files={"file": ("ok.png", images(1)[0])})
    text = httpx.get(f"{gateway.url}/metrics").text
    assert re.search(r'fashion_http_requests_total\{method="POST",route="/predict",status="200"\} [1-9]', text), text
    assert 'fashion_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/predict"}' in text
    access = (gateway.workdir / "logs" / "gateway.log").read_text()
    assert re.search(r"method=POST path=/predict status=200 latency_ms=[\d.]+", access)


def test_inference_down_gives_unhealthy_and_503(tmp_path) -> None:
    inference_port = free_port()
    gw = start_gateway(tmp_path, f"127.0.0.1:{inference_port}", FASHION_GATEWAY_TIMEOUT_S="3")
    try:
        gw.wait_ready()
        resp = httpx.get(f"{gw.url}/health", timeout=30)
        assert resp.status_code == 503
        body = resp.json()
        assert list(body) == ["status", "model_loaded", "classes", "timestamp"]
        assert body["status"] == "unhealthy" and body["model_loaded"] is False
        resp = httpx.post(f"{gw.url}/predict", files={"file": ("a.png", images(1)[0])}, timeout=30)
        assert_error(resp, 503, "UNAVAILABLE", "Inference service unavailable")
        assert resp.headers.get("retry-after") == "1"
        # The reason stays, the address of the service behind the gateway does not (its log has it).
        assert str(inference_port) not in resp.text and "<address>" in resp.text, resp.text
        assert_error(httpx.get(f"{gw.url}/stats", timeout=30), 503, "UNAVAILABLE", "Inference")
        assert_error(httpx.get(f"{gw.url}/batch/jobs", timeout=30), 503, "UNAVAILABLE", "Batch service")
        assert_error(httpx.get(f"{gw.url}/monitor/health", timeout=30), 503, "UNAVAILABLE", "Monitor service")
        assert "ERROR" in (tmp_path / "logs" / "gateway_errors.log").read_text()
        assert f"127.0.0.1:{inference_port}" in (tmp_path / "logs" / "gateway_errors.log").read_text()
    finally:
        code = gw.terminate()
    assert code == 0 and "Application shutdown complete" in gw.output(), gw.output()


def test_traceparent_is_continued_without_an_exporter(gateway: GatewayProcess, inference_server) -> None:
    """No OTLP exporter here: the gateway records no spans but carries the caller's trace into the
    gRPC call, so both services' log lines for this request carry the caller's trace id."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    resp = httpx.post(f"{gateway.url}/predict", files={"file": ("a.png", images(1)[0])},
                      headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    assert resp.status_code == 200
    api_log = inference_server.log_path.parent / "logs" / "api.log"
    gateway_log = gateway.workdir / "logs" / "gateway.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (trace_id in api_log.read_text() and trace_id in gateway_log.read_text()):
        time.sleep(0.1)
    assert re.search(rf"trace_id={trace_id}\].*method=/fashion.v1.InferenceService/Classify status=OK",
                     api_log.read_text())
    assert re.search(rf"trace_id={trace_id}\].*method=POST path=/predict status=200", gateway_log.read_text())

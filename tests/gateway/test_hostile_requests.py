"""Hostile and unusual requests to the gateway, through real HTTP to gateway processes in front of the
real Inference service: each gets a clear 4xx naming the problem (never a 500 or a retryable 429),
HEAD works wherever GET does, compression is refused or chosen as HTTP says, and a 500 is logged once."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import start_inference
from tests.gateway.conftest import GatewayProcess, start_gateway
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, free_port

MODEL = "linear-test"
MESSAGE_LIMIT = 262_144  # FASHION_MAX_MESSAGE_BYTES of the gateway below: under its body limit
BODY_LIMIT = 1_048_576


@pytest.fixture(scope="module")
def hostile_gateway(tmp_path_factory: pytest.TempPathFactory,
                    inference_server: ServiceProcess) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway-hostile"), inference_server.address,
                       FASHION_MAX_BATCH_UPLOAD_BYTES=str(BODY_LIMIT), FASHION_MAX_MESSAGE_BYTES=str(MESSAGE_LIMIT))
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.terminate()


def infer_url(gw: GatewayProcess) -> str:
    return f"{gw.url}/v2/models/{MODEL}/infer"


def image_input(**overrides: object) -> dict[str, object]:
    return {"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784, **overrides}


def post(gw: GatewayProcess, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(infer_url(gw), content=body, headers={"content-type": "application/json", **headers},
                      timeout=60)


def assert_v2_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert isinstance(message, str)
    for word in words:
        assert word in message, (word, message)
    return message


def test_a_request_over_the_grpc_message_limit_is_413_not_429(hostile_gateway: GatewayProcess) -> None:
    # 200 zero images as JSON: ~314 KB of body (under the body limit), 627 KB of FP32 raw data.
    body = json.dumps({"inputs": [{"name": "image_fp32", "datatype": "FP32", "shape": [200, 1, 28, 28],
                                   "data": [0] * (200 * 784)}]}, separators=(",", ":")).encode()
    assert len(body) < BODY_LIMIT
    response = post(hostile_gateway, body)
    message = assert_v2_error(response, 413, str(MESSAGE_LIMIT), "FASHION_MAX_MESSAGE_BYTES", "split")
    assert "Retry-After" not in response.headers
    size = int(message.split("request is ")[1].split(" bytes")[0])
    assert size > 200 * 784 * 4
    # The advice holds: requests of the advised size go through.
    fitting = int(message.rsplit("at most ", 1)[1])
    assert 1 <= fitting < 200
    small = json.dumps({"inputs": [{"name": "image_fp32", "datatype": "FP32", "shape": [fitting, 1, 28, 28],
                                    "data": [0] * (fitting * 784)}]}).encode()
    assert post(hostile_gateway, small).status_code == 200


def test_a_request_over_the_inference_services_message_limit_is_413(
        tmp_path: Path, linear_model: tuple[Path, np.ndarray]) -> None:
    # The gateway's channel takes the request (16 MiB default); the Inference service's 128 KiB limit refuses it.
    svc = start_inference(tmp_path / "inference", linear_model[0], FASHION_MAX_MESSAGE_BYTES="131072")
    gw = start_gateway(tmp_path / "gateway", svc.address, FASHION_MAX_BATCH_UPLOAD_BYTES=str(BODY_LIMIT))
    try:
        svc.wait_serving()
        gw.wait_ready()
        body = json.dumps({"inputs": [{"name": "image_fp32", "datatype": "FP32", "shape": [200, 1, 28, 28],
                                       "data": [0] * (200 * 784)}]}).encode()
        response = post(gw, body)
        assert_v2_error(response, 413, "larger than max", "FASHION_MAX_MESSAGE_BYTES", "split")
        assert "Retry-After" not in response.headers
    finally:
        gw.terminate()
        svc.terminate()


def test_deeply_nested_json_is_400(hostile_gateway: GatewayProcess) -> None:
    assert_v2_error(post(hostile_gateway, b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply")
    nested = json.dumps({"inputs": [image_input(data=[])]}).replace("[]", "[" * 100_000 + "]" * 100_000)
    assert_v2_error(post(hostile_gateway, nested.encode()), 400, "nested too deeply")
    assert "Traceback" not in hostile_gateway.output()


def test_shape_dimensions_past_int64_are_400(hostile_gateway: GatewayProcess) -> None:
    for dims in ([1 << 63, 1, 28, 28], [-(1 << 63) - 1, 1, 28, 28], [1, 1, 28, 1 << 70]):
        body = json.dumps({"inputs": [image_input(shape=dims)]}).encode()
        assert_v2_error(post(hostile_gateway, body), 400, "'image'", "64-bit")
    assert "Traceback" not in hostile_gateway.output()


@pytest.mark.parametrize(("header", "names"), [
    ({"id": "\ud800", "inputs": [image_input()]}, ["`id`"]),
    ({"inputs": [image_input(name="im\udfffage")]}, ["inputs[0]'s `name`"]),
    ({"inputs": [image_input(datatype="UINT8\ud800")]}, ["`datatype`"]),
    ({"parameters": {"\ud800": 1}, "inputs": [image_input()]}, ["parameter name"]),
    ({"parameters": {"note": "\ud800"}, "inputs": [image_input()]}, ["parameter 'note'"]),
    ({"inputs": [image_input(parameters={"k\ud800": True})]}, ["parameter name"]),
    ({"inputs": [image_input()], "outputs": [{"name": "\ud800"}]}, ["outputs[0]'s `name`"]),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]},
     ["'image_bytes'", "lone surrogate"]),
], ids=["id", "input name", "datatype", "parameter key", "parameter value", "input parameter key", "output name",
        "bytes data"])
def test_lone_surrogates_are_400_naming_the_field(hostile_gateway: GatewayProcess, header: dict[str, object],
                                                  names: list[str]) -> None:
    body = json.dumps(header).encode()  # ensure_ascii: the surrogates travel as \ud800 escapes
    assert b"\\ud" in body
    assert_v2_error(post(hostile_gateway, body), 400, *names)
    assert "Traceback" not in hostile_gateway.output()


def test_head_works_wherever_get_does(hostile_gateway: GatewayProcess) -> None:
    for path in ("/health", "/healthz", "/v2/health/live", f"/v2/models/{MODEL}", "/model", "/openapi.json"):
        get, head = httpx.get(hostile_gateway.url + path), httpx.head(hostile_gateway.url + path)
        assert get.status_code == head.status_code == 200, (path, head.status_code, head.text)
        assert head.content == b""
    # POST-only routes still say which method they take; the OpenAPI document lists GET only.
    assert httpx.head(infer_url(hostile_gateway)).status_code == 405
    paths = httpx.get(f"{hostile_gateway.url}/openapi.json").json()["paths"]
    assert "head" not in paths["/health"] and "get" in paths["/health"]


def test_concatenated_gzip_bodies_are_refused(hostile_gateway: GatewayProcess) -> None:
    body = json.dumps({"inputs": [image_input()]}).encode()
    assert post(hostile_gateway, gzip.compress(body), **{"content-encoding": "gzip"}).status_code == 200
    for trailing in (b"trailing", gzip.compress(b"second member")):
        response = post(hostile_gateway, gzip.compress(body) + trailing, **{"content-encoding": "gzip"})
        assert_v2_error(response, 400, f"{len(trailing)} bytes after the end")
    deflated = zlib.compress(body) + b"x"
    assert_v2_error(post(hostile_gateway, deflated, **{"content-encoding": "deflate"}), 400, "1 bytes after the end")


@pytest.mark.parametrize(("accept", "expected"), [
    ("gzip", "gzip"), ("gzip;q=0", None), ("gzip; q=0.0, deflate", "deflate"), ("deflate;q=1, gzip;q=0.5", "deflate"),
    ("gzip;q=0.5, deflate;q=0.5", "gzip"), ("*;q=0", None), ("*", "gzip"), ("gzip;q=0, *", "deflate"),
    ("GZIP;Q=0", None), ("identity", None),
])
def test_accept_encoding_q_values_are_honoured(hostile_gateway: GatewayProcess, accept: str,
                                               expected: str | None) -> None:
    body = json.dumps({"inputs": [image_input()]}).encode()
    with httpx.Client() as client:  # raw bytes: httpx would decode what it asked for itself
        response = client.post(infer_url(hostile_gateway), content=body,
                               headers={"content-type": "application/json", "accept-encoding": accept})
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == expected
    assert "outputs" in response.json()


def test_top_k_takes_ascii_digits_only_on_every_route(gateway: GatewayProcess) -> None:
    image = encode(fashion_images(1)[0][0])
    for value in ("１", "+1", " 1", "1_0", "-1", "1.0", "1001"):
        single = httpx.post(f"{gateway.url}/predict", params={"top_k": value}, files={"file": ("a.png", image)})
        batch = httpx.post(f"{gateway.url}/predict/batch", params={"top_k": value},
                           files=[("files", ("a.png", image))])
        for response in (single, batch):
            assert response.status_code == 400, (value, response.text)
            assert response.json()["error"]["message"].startswith("top_k")
        assert single.json() == batch.json(), value  # the same words on both routes
    single = httpx.post(f"{gateway.url}/predict", params={"top_k": "2"}, files={"file": ("a.png", image)})
    assert single.status_code == 200 and len(single.json()["top_k"]) == 2


# The gateway's own application, with one more route that fails: how an unexpected error is answered and logged.
FAILING_GATEWAY = """
import sys
import uvicorn
from services.gateway.app import factory

app = factory()


@app.get("/fail")
async def fail() -> None:
    raise RuntimeError("a failure for the test")


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None)
"""


def test_an_unexpected_error_is_a_json_500_logged_once(tmp_path: Path, inference_server: ServiceProcess) -> None:
    port = free_port()
    log_path = tmp_path / "gateway.out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASHION_INFERENCE_ADDRESS": inference_server.address,
           "FASHION_BATCH_ADDRESS": f"127.0.0.1:{free_port()}", "FASHION_MONITOR_ADDRESS": f"127.0.0.1:{free_port()}"}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", FAILING_GATEWAY, str(port)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}", tmp_path, log_path)
    try:
        gw.wait_ready()
        response = httpx.get(f"{gw.url}/fail")
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "INTERNAL"
        assert httpx.get(f"{gw.url}/healthz").status_code == 200  # still serving
    finally:
        gw.terminate()
    output = gw.output()
    assert output.count("a failure for the test") >= 1
    assert output.count("Unhandled error on GET /fail") == 1, output
    assert output.count("Traceback") == 1, output
    assert "Exception in ASGI application" not in output

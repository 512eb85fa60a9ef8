"""The Open Inference Protocol's REST API on the gateway (/v2), with an unmodified tritonclient.http
(and plain HTTP for what it can not send): health, metadata, every input form as JSON and as binary
tensor data, classification, compression, statistics, errors in the protocol's body, and the shipped
model's accuracy through it. The gateway forwards to the Inference service's KServe V2 gRPC API."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

from services.inference import fashion_mnist  # noqa: E402
from services.inference.imaging import Preprocessor  # noqa: E402
from tests.gateway.conftest import GatewayProcess, start_gateway  # noqa: E402
from tests.images import encode, fashion_images  # noqa: E402
from tests.support import LABELS, ServiceProcess, assert_top_classes, linear_expected  # noqa: E402

PRE = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))  # the fixture model's manifest
MODEL = "linear-test"
BODY_LIMIT = 262_144


@pytest.fixture(scope="module")
def v2_gateway(tmp_path_factory: pytest.TempPathFactory, inference_server: ServiceProcess) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway-v2"), inference_server.address,
                       FASHION_MAX_BATCH_UPLOAD_BYTES=str(BODY_LIMIT))
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.terminate()


@pytest.fixture
def triton(v2_gateway: GatewayProcess) -> Iterator[tritonclient_http.InferenceServerClient]:
    client = tritonclient_http.InferenceServerClient(v2_gateway.url.removeprefix("http://"))
    yield client
    client.close()


def tensor(name: str, data: np.ndarray, binary: bool = True) -> tritonclient_http.InferInput:
    inp = tritonclient_http.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
    inp.set_data_from_numpy(data, binary_data=binary)
    return inp


def files(images: list[bytes]) -> np.ndarray:
    return np.array(images, dtype=np.object_)


def expected(wb: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    return linear_expected(wb, np.stack([PRE(encode(img)) for img in pixels]))


def test_health_and_metadata(triton, v2_gateway: GatewayProcess) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "7")
    assert not triton.is_model_ready("no-such-model") and not triton.is_model_ready(MODEL, "8")
    meta = triton.get_server_metadata()
    assert meta["name"] == "fashion-inference"
    assert meta["extensions"] == ["classification", "statistics", "binary_tensor_data"]
    model = triton.get_model_metadata(MODEL)
    assert model == triton.get_model_metadata(MODEL, "7")
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["7"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("image", "UINT8", [-1, 1, 28, 28]), ("image_fp32", "FP32", [-1, 1, 28, 28]), ("image_bytes", "BYTES", [-1])]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    live = httpx.get(f"{v2_gateway.url}/v2/health/live")
    assert live.status_code == 200 and live.content == b""
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no-such-model")
    assert err.value.status() == "404" and "is not served here" in err.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_input_form_gives_the_models_answer(triton, linear_model, binary: bool) -> None:
    _, wb = linear_model
    x, _ = fashion_images(5)
    want = expected(wb, x)
    out = [tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary)]
    answers = {
        "UINT8": triton.infer(MODEL, [tensor("image", x[:, None], binary)], outputs=out, request_id="r1"),
        "FP32": triton.infer(MODEL, [tensor("image_fp32", x[:, None].astype(np.float32) / 255, binary)], outputs=out),
        "normalized": triton.infer(MODEL, [tensor("image_fp32", np.stack([PRE(encode(img)) for img in x]), binary)],
                                   outputs=out, parameters={"normalized": True}),
        "versioned": triton.infer(MODEL, [tensor("image", x[:, None], binary)], model_version="7", outputs=out),
        "no outputs named": triton.infer(MODEL, [tensor("image", x[:, None], binary)]),
    }
    if binary:  # BYTES elements that are files can only travel as binary data
        answers["PNG"] = triton.infer(MODEL, [tensor("image_bytes", files([encode(img) for img in x]))], outputs=out)
    assert answers["UINT8"].get_response()["id"] == "r1"
    assert answers["UINT8"].get_response()["model_version"] == "7"
    for form, result in answers.items():
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=1e-4, atol=1e-6, err_msg=form)
        output = result.get_output("probabilities")
        assert ("data" not in output) == (binary or form == "no outputs named"), (form, output.keys())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(triton, linear_model, binary: bool) -> None:
    _, wb = linear_model
    x, _ = fashion_images(3)
    want = expected(wb, x)
    result = triton.infer(MODEL, [tensor("image", x[:, None])], outputs=[
        tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 3) and result.get_output("probabilities")["datatype"] == "BYTES"
    for row, probs in zip(top, want, strict=True):
        assert_top_classes([e.decode() if isinstance(e, bytes) else e for e in row], probs, LABELS)


def test_compressed_requests_and_answers(triton, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(4)
    for request, answer in (("gzip", "deflate"), ("deflate", "gzip")):
        result = triton.infer(MODEL, [tensor("image", x[:, None])], request_compression_algorithm=request,
                              response_compression_algorithm=answer)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected(wb, x), rtol=1e-4, atol=1e-6)


def test_statistics_move_with_calls(triton) -> None:
    def stats() -> dict:
        (model,) = triton.get_inference_statistics(MODEL)["model_stats"]
        assert (model["name"], model["version"]) == (MODEL, "7")
        return model

    before = stats()
    x, _ = fashion_images(3)
    triton.infer(MODEL, [tensor("image", x[:, None])])
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] > before["execution_count"]
    for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][part]["count"] == before["inference_stats"][part]["count"] + 1, part
        assert after["inference_stats"][part]["ns"] > before["inference_stats"][part]["ns"], part
    assert triton.get_inference_statistics(MODEL, "7")["model_stats"][0]["inference_count"] >= 3
    assert [m["name"] for m in triton.get_inference_statistics()["model_stats"]] == [MODEL]


def binary_body(header: dict, *data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(data), {"Inference-Header-Content-Length": str(len(text))}


def uint8_header(n: int = 1, size: int = 784, name: str = "image") -> dict:
    return {"inputs": [{"name": name, "datatype": "UINT8", "shape": [n, 1, 28, 28],
                        "parameters": {"binary_data_size": size}}]}


PIXELS = bytes(784)


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    (*binary_body(uint8_header(), PIXELS[:-1]), 400, "goes past the end of the binary data"),
    (*binary_body(uint8_header(), PIXELS + b"x"), 400, "1 bytes of binary data after"),
    (*binary_body(uint8_header(2, 784)), 400, "goes past the end"),
    (*binary_body(uint8_header(2, 784), PIXELS), 400, "has 784 bytes of raw data; UINT8 [2, 1, 28, 28] needs 1568"),
    (b"{not json", {}, 400, "not valid JSON"),
    (b"[]", {}, 400, "must be a JSON object"),
    (json.dumps({"inputs": []}).encode(), {}, 400, "non-empty array"),
    (PIXELS, {"Inference-Header-Content-Length": "5000"}, 400, "past the end of the 784-byte body"),
    (PIXELS, {"Inference-Header-Content-Length": "x"}, 400, "Inference-Header-Content-Length"),
    (json.dumps({"inputs": [{"name": "image_fp32", "datatype": "FP32", "shape": [1, 1, 28, 28],
                             "data": [0.5] * 783}]}).encode(), {}, 400, "not a regular array of 784 FP32 numbers"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                             "data": [300] * 784}]}).encode(), {}, 400, "outside UINT8's range [0, 255]"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                             "data": [0.5] * 784}]}).encode(), {}, 400, "`data` must be integers"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],
                             "data": [0.5] * 784}]}).encode(), {}, 400, "go to input 'image_fp32'"),
    (json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                             "data": ["not an image"]}]}).encode(), {}, 400, "element 0: not an image"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28]}]}).encode(), {}, 400,
     "neither `data` nor parameters.binary_data_size"),
    (*binary_body({**uint8_header(), "parameters": {"binary_data_output": "yes"}}, PIXELS), 400,
     "'binary_data_output' must be true or false"),
    (binary_body(uint8_header(), PIXELS)[0], {"Content-Encoding": "br"}, 400, "Content-Encoding 'br'"),
    (bytes(BODY_LIMIT + 1), {}, 413, f"over the limit of {BODY_LIMIT} bytes"),
    (gzip.compress(bytes(BODY_LIMIT + 1)), {"Content-Encoding": "gzip"}, 413, "inflates to over the limit"),
], ids=["short", "long", "no-data", "size-vs-shape", "json", "not-object", "no-inputs", "header-past-end",
        "header-not-int", "json-count", "json-range", "json-floats-for-uint8", "fp32-to-uint8", "bytes-not-image",
        "no-data-at-all", "bad-flag", "encoding", "too-large", "bomb"])
def test_bad_requests_get_the_protocols_error_body(v2_gateway: GatewayProcess, body, headers, status, words) -> None:
    resp = httpx.post(f"{v2_gateway.url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert isinstance(error, str) and words in error, error


def test_unknown_model_and_stats_errors(v2_gateway: GatewayProcess) -> None:
    body, headers = binary_body(uint8_header(), PIXELS)
    resp = httpx.post(f"{v2_gateway.url}/v2/models/other/infer", content=body, headers=headers)
    assert resp.status_code == 404 and "is not served here" in resp.json()["error"]
    resp = httpx.get(f"{v2_gateway.url}/v2/models/other/stats")
    assert resp.status_code == 404 and isinstance(resp.json()["error"], str)
    resp = httpx.get(f"{v2_gateway.url}/v2/models/{MODEL}/ready")
    assert resp.status_code == 200 and resp.content == b""


def test_openapi_documents_the_v2_routes(v2_gateway: GatewayProcess) -> None:
    spec = httpx.get(f"{v2_gateway.url}/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats", "/v2/models/{name}",
                 "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready", "/v2/models/{name}/stats",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert any(p["name"] == "Inference-Header-Content-Length" for p in infer["parameters"])


def test_raw_binary_bytes_tensor(v2_gateway: GatewayProcess, linear_model) -> None:
    """BYTES elements in binary data: each a 4-byte little-endian length, then the file."""
    _, wb = linear_model
    x, _ = fashion_images(2)
    pngs = [encode(img) for img in x]
    raw = b"".join(struct.pack("<I", len(p)) + p for p in pngs)
    header = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": len(raw)}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    body, headers = binary_body(header, raw)
    resp = httpx.post(f"{v2_gateway.url}/v2/models/{MODEL}/infer", content=zlib.compress(body),
                      headers={**headers, "Content-Encoding": "deflate"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    (output,) = resp.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected(wb, x), rtol=1e-4, atol=1e-6)


# --- the shipped model through REST ----------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_gateway(tmp_path_factory: pytest.TempPathFactory, fashion_server: ServiceProcess
                    ) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway-shipped"), fashion_server.address)
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.terminate()


def test_shipped_model_accuracy_over_rest(shipped_gateway: GatewayProcess) -> None:
    """All 10,000 test images as binary UINT8 pixels, binary FP32 in [0, 1] and binary PNG files,
    300 as JSON FP32 (about 15 KB of JSON an image), 200 as product-photo JPEGs: the model's accuracy
    through tritonclient.http."""
    x, y = fashion_mnist.load("test")
    client = tritonclient_http.InferenceServerClient(shipped_gateway.url.removeprefix("http://"),
                                                     network_timeout=120, connection_timeout=120)
    rng = np.random.default_rng(7)
    picks = rng.choice(len(y), 200, replace=False)
    forms = {
        "UINT8": ("image", x[:, None], y, True),
        "FP32": ("image_fp32", x[:, None].astype(np.float32) / 255, y, True),
        "PNG": ("image_bytes", files([fashion_mnist.encode_png(img) for img in x]), y, True),
        "FP32 JSON": ("image_fp32", x[:300, None].astype(np.float32) / 255, y[:300], False),
        "photos": ("image_bytes", files([fashion_mnist.render_product_photo(x[i], rng) for i in picks]), y[picks],
                   True),
    }
    top1 = {}
    try:
        for form, (name, data, labels, binary) in forms.items():
            predictions = []
            for start in range(0, len(labels), 1000):
                result = client.infer("fashion-mnist-cnn", [tensor(name, data[start: start + 1000], binary)])
                predictions.append(result.as_numpy("probabilities").argmax(axis=1))
            top1[form] = float((np.concatenate(predictions) == labels).mean())
    finally:
        client.close()
    print(f"top-1 over REST: {top1}")
    for form in ("UINT8", "FP32", "PNG", "FP32 JSON"):
        assert top1[form] >= 0.935, (form, top1[form])
    assert top1["photos"] >= 0.90, top1["photos"]

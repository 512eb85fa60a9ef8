"""KServe V2 / Open Inference Protocol (inference.GRPCInferenceService) with an unmodified Triton
client: every input form (UINT8 pixels, FP32 in [0, 1], the explicit normalized form, encoded files
as BYTES), classification, the stream, statistics, bad tensors; and the shipped model's accuracy
through each form.

This module imports tritonclient, whose generated protos register the same `inference.*`
message names as ours: no test in this process may import fashion.kserve (nor
services.inference.kserve, services.common.tensors's callers that build messages, the gateway's
routes); the server runs in its own process anyway.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

import services  # noqa: E402
from services.inference import fashion_mnist  # noqa: E402
from services.inference.imaging import Preprocessor  # noqa: E402
from tests.images import encode, fashion_images, png_declaring  # noqa: E402
from tests.support import LABELS, assert_top_classes, linear_expected  # noqa: E402

PRE = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))  # the fixture model's manifest
MODEL = "linear-test"
SHIPPED = "fashion-mnist-cnn"


@pytest.fixture
def triton(inference_server):
    client = tritonclient_grpc.InferenceServerClient(inference_server.address)
    yield client
    client.close()


def tensor(name: str, data: np.ndarray):  # type: ignore[no-untyped-def]
    """A tritonclient InferInput holding `data` (BYTES: an object array of bytes)."""
    inp = tritonclient_grpc.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
    inp.set_data_from_numpy(data)
    return inp


def files(images: list[bytes]) -> np.ndarray:
    return np.array(images, dtype=np.object_)


def expected(wb: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """The fixture model's answer for 28x28 uint8 images, preprocessed as Classify does."""
    return linear_expected(wb, np.stack([PRE(encode(img)) for img in pixels]))


def test_server_and_model_metadata(triton) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert triton.is_model_ready(MODEL, "7")
    meta = triton.get_server_metadata()
    assert (meta.name, meta.version) == ("fashion-inference", services.__version__)
    assert list(meta.extensions) == ["classification", "statistics"]
    model = triton.get_model_metadata(MODEL)
    assert model.platform == "onnxruntime_onnx" and list(model.versions) == ["7"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("image", "UINT8", [-1, 1, 28, 28]), ("image_fp32", "FP32", [-1, 1, 28, 28]), ("image_bytes", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("probabilities", "FP32", [-1, 10])]
    index = triton.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "7", "READY")]


def test_every_input_form_gives_the_models_answer(triton, linear_model) -> None:
    """The same pixels as UINT8, as FP32 in [0, 1], as normalized FP32 (explicitly) and as PNG files
    give the answer Classify's preprocessing leads to."""
    _, wb = linear_model
    x, _ = fashion_images(6)
    want = expected(wb, x)
    unit = x[:, None].astype(np.float32) / 255
    normalized = np.stack([PRE(encode(img)) for img in x])
    out = tritonclient_grpc.InferRequestedOutput("probabilities")
    answers = {
        "UINT8": triton.infer(MODEL, [tensor("image", x[:, None])], outputs=[out], request_id="r1"),
        "FP32": triton.infer(MODEL, [tensor("image_fp32", unit)]),
        "normalized": triton.infer(MODEL, [tensor("image_fp32", normalized)], parameters={"normalized": True}),
        "PNG": triton.infer(MODEL, [tensor("image_bytes", files([encode(img) for img in x]))]),
    }
    assert answers["UINT8"].get_response().id == "r1"
    for form, result in answers.items():
        probs = result.as_numpy("probabilities")
        assert probs.shape == (6, 10), form
        np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-6, err_msg=form)


def test_bytes_input_preprocesses_photos_as_classify_does(triton, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(3)
    rng = np.random.default_rng(5)
    photos = [fashion_mnist.render_product_photo(img, rng) for img in x]
    probs = triton.infer(MODEL, [tensor("image_bytes", files(photos))]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, linear_expected(wb, np.stack([PRE(p) for p in photos])), rtol=1e-4, atol=1e-6)


def test_typed_contents(inference_server, linear_model) -> None:
    """Inputs as typed `contents` (uint_contents, fp32_contents, bytes_contents) instead of raw bytes."""
    _, wb = linear_model
    x, _ = fashion_images(2)
    want = expected(wb, x)
    shape = [2, 1, 28, 28]
    requests = []
    for name, datatype, field, values in (
            ("image", "UINT8", "uint_contents", x.ravel().tolist()),
            ("image_fp32", "FP32", "fp32_contents", (x.astype(np.float32) / 255).ravel().tolist()),
            ("image_bytes", "BYTES", "bytes_contents", [encode(img) for img in x])):
        req = service_pb2.ModelInferRequest(model_name=MODEL)
        inp = req.inputs.add(name=name, datatype=datatype, shape=[2] if datatype == "BYTES" else shape)
        getattr(inp.contents, field).extend(values)
        requests.append(req)
    with grpc.insecure_channel(inference_server.address) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for req in requests:
            resp = stub.ModelInfer(req, timeout=10)
            probs = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))
            np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-6, err_msg=req.inputs[0].name)
        bad = service_pb2.ModelInferRequest(model_name=MODEL)
        bad.inputs.add(name="image", datatype="UINT8", shape=shape).contents.uint_contents.extend([300] * 1568)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the range of UINT8" in err.value.details()
        short = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()[:-1]])
        short.inputs.add(name="image", datatype="UINT8", shape=shape)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(short, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has 1567 bytes of raw data; UINT8 [2, 1, 28, 28] needs 1568" in err.value.details()


def test_classification_extension(triton, linear_model) -> None:
    """class_count=k: the top k as BYTES "score:index:label", best first, as Triton answers."""
    _, wb = linear_model
    x, _ = fashion_images(4)
    want = expected(wb, x)
    result = triton.infer(MODEL, [tensor("image", x[:, None])],
                          outputs=[tritonclient_grpc.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3) and result.get_output("probabilities").datatype == "BYTES"
    for row, probs in zip(top, want, strict=True):
        assert_top_classes([entry.decode() for entry in row], probs, LABELS)
    everything = triton.infer(MODEL, [tensor("image", x[:1, None])], outputs=[
        tritonclient_grpc.InferRequestedOutput("probabilities", class_count=50)]).as_numpy("probabilities")
    assert everything.shape == (1, 10)


def test_stream_answers_every_request_and_survives_bad_ones(inference_server, linear_model) -> None:
    """start_stream + async_stream_infer: one answer per request (a bad one gets its error, the
    stream goes on), through the same batcher."""
    _, wb = linear_model
    x, _ = fashion_images(12)
    want = expected(wb, x)
    answers: queue.Queue = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(inference_server.address)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, img in enumerate(x):
            if i == 5:
                client.async_stream_infer(MODEL, [tensor("image", img[None, None].astype(np.float32) / 255)],
                                          request_id="bad")
            client.async_stream_infer(MODEL, [tensor("image", img[None, None])], request_id=str(i))
        client.async_stream_infer(MODEL, [tensor("image_bytes", files([encode(img) for img in x]))],
                                  request_id="all", outputs=[
                                      tritonclient_grpc.InferRequestedOutput("probabilities", class_count=1)])
        client.stop_stream()
    finally:
        client.close()
    got = [answers.get_nowait() for _ in range(answers.qsize())]
    assert len(got) == 14
    errors = [error for result, error in got if error is not None]
    assert len(errors) == 1 and "image_fp32" in errors[0].message()
    results = {result.get_response().id: result for result, error in got if error is None}
    assert [r for r in results if r not in ("all",)] == [str(i) for i in range(12)]  # in request order
    for i in range(12):
        np.testing.assert_allclose(results[str(i)].as_numpy("probabilities")[0], want[i], rtol=1e-4, atol=1e-6)
    top1 = results["all"].as_numpy("probabilities")
    assert [int(entry[0].split(b":")[1]) for entry in top1] == list(want.argmax(axis=1))


def test_statistics_move_with_calls(triton) -> None:
    def stats():  # type: ignore[no-untyped-def]
        (model,) = triton.get_inference_statistics(MODEL).model_stats
        assert (model.name, model.version) == (MODEL, "7")
        return model

    before = stats()
    x, _ = fashion_images(5)
    triton.infer(MODEL, [tensor("image", x[:, None])])
    triton.infer(MODEL, [tensor("image_bytes", files([encode(img) for img in x[:2]]))])
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, [tensor("image_bytes", files([b"not an image"]))])
    after = stats()
    s0, s1 = before.inference_stats, after.inference_stats
    assert after.inference_count - before.inference_count == 7
    assert after.execution_count >= before.execution_count + 2
    assert s1.success.count - s0.success.count == 2
    assert s1.fail.count - s0.fail.count == 1 and s1.fail.ns > s0.fail.ns
    for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(s1, part).count - getattr(s0, part).count == 2, part
        assert getattr(s1, part).ns > getattr(s0, part).ns, part
    assert after.last_inference >= before.last_inference and abs(after.last_inference / 1000 - time.time()) < 60
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert [m.name for m in triton.get_inference_statistics("").model_stats] == [MODEL]
    with pytest.raises(InferenceServerException) as err:
        triton.get_inference_statistics("no-such-model")
    assert "StatusCode.NOT_FOUND" in str(err.value.status())


def pixels() -> np.ndarray:
    return fashion_images(2)[0][:, None]


def unit() -> np.ndarray:
    return pixels().astype(np.float32) / 255


def out_of_range() -> np.ndarray:
    x = np.full((1, 1, 28, 28), 0.5, np.float32)
    x[0, 0, 0, :2] = -0.5, 1.5
    return x


def png() -> bytes:
    return encode(fashion_images(1)[0][0])


@pytest.mark.parametrize(("inputs", "kw", "code", "message"), [
    (lambda: [tensor("image", unit())], {}, "INVALID_ARGUMENT",
     "must be UINT8, not FP32: it takes pixel values 0-255. FP32 pixels / 255 in [0, 1] go to input 'image_fp32'"),
    (lambda: [tensor("image_fp32", out_of_range())], {}, "INVALID_ARGUMENT", "values from -0.5 to 1.5. A tensor "
     "already normalized with the model's mean and std goes with the request parameter normalized=true"),
    (lambda: [tensor("image_fp32", np.full((1, 1, 28, 28), np.nan, np.float32))], {}, "INVALID_ARGUMENT",
     "input 'image_fp32' has non-finite values"),
    (lambda: [tensor("image_fp32", pixels())], {}, "INVALID_ARGUMENT", "UINT8 pixel values go to input 'image'"),
    (lambda: [tensor("image", pixels())], {"parameters": {"normalized": True}}, "INVALID_ARGUMENT",
     "normalized=true applies to FP32 input 'image_fp32' only"),
    (lambda: [tensor("image", pixels()[:, 0])], {}, "INVALID_ARGUMENT",
     "has shape [2, 28, 28]; the model takes [-1, 1, 28, 28]"),
    (lambda: [tensor("image", pixels().astype(np.int32))], {}, "INVALID_ARGUMENT", "must be UINT8, not INT32"),
    (lambda: [tensor("pixels", pixels())], {}, "INVALID_ARGUMENT",
     "unknown input 'pixels'; the model takes one of 'image' (UINT8 [-1, 1, 28, 28])"),
    (lambda: [tensor("image", pixels()), tensor("image_fp32", unit())], {}, "INVALID_ARGUMENT",
     "expected exactly 1 input"),
    (lambda: [tensor("image_bytes", files([png()]).reshape(1, 1))], {}, "INVALID_ARGUMENT", "it takes [N]"),
    (lambda: [tensor("image_bytes", files([png(), b"not an image", b""]))], {}, "INVALID_ARGUMENT",
     "element 1: not an image"),
    (lambda: [tensor("image_bytes", files([png_declaring(20_000, 20_000)]))], {}, "INVALID_ARGUMENT",
     "element 0: too many pixels"),
    (lambda: [tensor("image_bytes", pixels())], {}, "INVALID_ARGUMENT",
     "must be BYTES, not UINT8: one encoded image file"),
    (lambda: [tensor("image", pixels())], {"outputs": [tritonclient_grpc.InferRequestedOutput("logits")]},
     "INVALID_ARGUMENT", "unknown output 'logits'"),
    (lambda: [tensor("image", pixels())],
     {"outputs": [tritonclient_grpc.InferRequestedOutput("probabilities", class_count=-2)]},
     "INVALID_ARGUMENT", "must be a class count >= 0"),
    (lambda: [tensor("image", pixels())], {"model_name": "no-such-model"}, "NOT_FOUND", "is not served here"),
    (lambda: [tensor("image", pixels())], {"model_version": "8"}, "NOT_FOUND", "has no version '8'"),
    (lambda: [tensor("image", np.zeros((5000, 1, 28, 28), np.uint8))], {}, "INVALID_ARGUMENT",
     "at most 4096 (the server's max_queue_size) fit in one request"),
    (lambda: [tensor("image", np.zeros((22_000, 1, 28, 28), np.uint8))], {}, "RESOURCE_EXHAUSTED",
     "larger than max"),
], ids=["fp32-to-uint8", "fp32-out-of-range", "nan", "uint8-to-fp32", "normalized-uint8", "shape", "int32",
        "unknown-input", "two-inputs", "bytes-shape", "bad-file", "bomb", "pixels-as-bytes", "unknown-output",
        "negative-class-count", "unknown-model", "unknown-version", "queue", "message-size"])
def test_bad_requests_are_refused_with_the_reason(triton, inputs, kw, code, message) -> None:
    kw = {"model_name": MODEL, **kw}
    with pytest.raises(InferenceServerException) as err:
        triton.infer(inputs=inputs(), **kw)
    assert err.value.status() == f"StatusCode.{code}", err.value
    assert message in err.value.message()
    assert triton.is_server_ready()


# --- the shipped model: accuracy through each input form --------------------------------------------
CHUNK = 1000
IN_FLIGHT = 3  # requests at once: 3,000 images, within the service's max_queue_size (4,096)


def accuracy(client, name: str, data, labels: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """Top-1 of the shipped model on `data` (an array, or a list of encoded files) sent as input `name`,
    CHUNK images per request, IN_FLIGHT requests at once."""
    answers: queue.Queue = queue.Queue()
    slots = threading.Semaphore(IN_FLIGHT)

    def answered(result, error, at: int) -> None:  # type: ignore[no-untyped-def]
        answers.put((at, result, error))
        slots.release()

    for start in range(0, len(labels), CHUNK):
        piece = data[start: start + CHUNK]
        inp = tensor(name, files(piece) if isinstance(piece, list) else piece)
        slots.acquire()
        client.async_infer(SHIPPED, [inp], callback=lambda result, error, at=start: answered(result, error, at),
                           client_timeout=120)
    predictions = np.empty(len(labels), np.int64)
    for _ in range(0, len(labels), CHUNK):
        at, result, error = answers.get(timeout=180)
        assert error is None, error
        probs = result.as_numpy("probabilities")
        predictions[at: at + len(probs)] = probs.argmax(axis=1)
    return float((predictions == labels).mean())


def test_shipped_model_accuracy_through_every_input_form(fashion_server) -> None:
    """All 10,000 Fashion-MNIST test images as UINT8 pixels, FP32 in [0, 1] and PNG files, and 400
    of them as product-photo JPEGs: each form reaches the model's accuracy (94.07% on the 28x28
    images, 93.2% on photos; without the server's normalization FP32 in [0, 1] gave 65%)."""
    x, y = fashion_mnist.load("test")
    client = tritonclient_grpc.InferenceServerClient(fashion_server.address)
    try:
        meta = client.get_model_metadata(SHIPPED)
        assert [t.name for t in meta.inputs] == ["image", "image_fp32", "image_bytes"]
        took = {}
        results = {}
        rng = np.random.default_rng(2024)
        picks = rng.choice(len(y), 400, replace=False)
        forms = {
            "image": (x[:, None], y),
            "image_fp32": (x[:, None].astype(np.float32) / 255, y),
            "image_bytes": ([fashion_mnist.encode_png(img) for img in x], y),
            "photos": ([fashion_mnist.render_product_photo(x[i], rng) for i in picks], y[picks]),
        }
        for form, (data, labels) in forms.items():
            start = time.perf_counter()
            results[form] = accuracy(client, "image_bytes" if form == "photos" else form, data, labels)
            took[form] = time.perf_counter() - start
    finally:
        client.close()
    print(f"top-1: {results}; seconds: {took}")
    for form in ("image", "image_fp32", "image_bytes"):
        assert results[form] >= 0.935, (form, results[form])
        assert took[form] < 60, (form, took[form])
    assert abs(results["image"] - results["image_fp32"]) <= 0.0005  # the same model input (batches may differ)
    assert results["photos"] >= 0.90, results["photos"]

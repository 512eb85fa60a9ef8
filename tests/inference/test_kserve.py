"""KServe V2 (inference.GRPCInferenceService) with an unmodified Triton client.

This module imports tritonclient, whose generated protos register the same `inference.*`
message names as ours: no test in this process may import services.inference.kserve; the
server runs in its own process anyway.
"""

from __future__ import annotations

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import services  # noqa: E402
from services.inference.imaging import Preprocessor  # noqa: E402
from tests.images import encode, fashion_images  # noqa: E402
from tests.support import linear_expected  # noqa: E402

PRE = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))


@pytest.fixture
def triton(inference_server):
    client = tritonclient_grpc.InferenceServerClient(inference_server.address)
    yield client
    client.close()


def test_server_and_model_metadata(triton) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("linear-test")
    assert triton.is_model_ready("linear-test", "7")
    meta = triton.get_server_metadata()
    assert (meta.name, meta.version) == ("fashion-inference", services.__version__)
    model = triton.get_model_metadata("linear-test")
    assert model.platform == "onnxruntime_onnx" and list(model.versions) == ["7"]
    assert (model.inputs[0].name, model.inputs[0].datatype, list(model.inputs[0].shape)) == (
        "image", "FP32", [-1, 1, 28, 28])
    assert (model.outputs[0].name, list(model.outputs[0].shape)) == ("probabilities", [-1, 10])
    index = triton.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [("linear-test", "7", "READY")]


def test_model_infer_raw_tensors(triton, linear_model) -> None:
    _, wb = linear_model
    x, _ = fashion_images(5)
    batch = np.stack([PRE(encode(img)) for img in x])
    inp = tritonclient_grpc.InferInput("image", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    out = tritonclient_grpc.InferRequestedOutput("probabilities")
    result = triton.infer("linear-test", [inp], outputs=[out], request_id="req-1")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs, linear_expected(wb, batch), rtol=1e-4, atol=1e-6)
    assert result.get_response().id == "req-1"


def test_model_infer_typed_contents(inference_server, linear_model) -> None:
    import grpc

    _, wb = linear_model
    x, _ = fashion_images(2)
    batch = np.stack([PRE(encode(img)) for img in x])
    req = service_pb2.ModelInferRequest(model_name="linear-test")
    tensor = req.inputs.add(name="image", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    with grpc.insecure_channel(inference_server.address) as ch:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    probs = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))
    np.testing.assert_allclose(probs, linear_expected(wb, batch), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("shape", "dtype", "model", "message"), [
    ([1, 28, 28], "FP32", "linear-test", "does not match the model input"),
    ([2, 1, 28, 28], "INT32", "linear-test", "must be FP32"),
    ([1, 1, 28, 28], "FP32", "no-such-model", "is not served here"),
])
def test_model_infer_rejects_bad_requests(triton, shape, dtype, model, message) -> None:
    data = np.zeros(shape, np.float32 if dtype == "FP32" else np.int32)
    inp = tritonclient_grpc.InferInput("image", shape, dtype)
    inp.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as err:
        triton.infer(model, [inp])
    assert message in err.value.message()
    assert triton.is_server_ready()

"""Requests that try the Inference service's limits, through real gRPC to a real service process: a
stream client that never reads its replies, a request larger than the whole queue, an empty batch,
non-finite FP32. Each gets a clear answer, costs the service bounded memory and leaves its statistics
true.

KServe requests go through tritonclient's messages, never fashion.kserve (test_kserve.py explains why).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import ServiceProcess

SMALL_QUEUE = 8  # max_queue_size of the small_queue_server


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory: pytest.TempPathFactory, linear_model: tuple[Path, np.ndarray]
                       ) -> Iterator[ServiceProcess]:
    """An Inference service whose queue holds at most SMALL_QUEUE images."""
    svc = start_inference(tmp_path_factory.mktemp("small-queue"), linear_model[0],
                          FASHION_MAX_QUEUE_SIZE=str(SMALL_QUEUE))
    try:
        svc.wait_serving()
        yield svc
    finally:
        svc.terminate()


def stats(address: str) -> pb.Stats:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.InferenceServiceStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)


def images(n: int) -> list[bytes]:
    x, _ = fashion_images(n)
    return [encode(img) for img in x]


# --- ClassifyStream: a client that sends without reading ----------------------------------------------
STREAM_MESSAGES = 1500
PADDING = "x" * 100_000  # in each request_id, echoed in each reply: 100 KB each way per message


async def test_stream_client_that_never_reads_is_held_back_then_answered_in_order(inference_server) -> None:
    image = images(1)[0]
    written = 0
    async with grpc.aio.insecure_channel(inference_server.address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).ClassifyStream()

        async def write_all() -> None:
            nonlocal written
            for i in range(STREAM_MESSAGES):
                await call.write(pb.ClassifyRequest(image=image, request_id=f"{i}:{PADDING}"))
                written += 1
            await call.done_writing()

        writer = asyncio.ensure_future(write_all())
        # Until the server stops taking messages (no write completes for a while) or takes them all.
        before = -1
        while written != before and not writer.done():
            before = written
            await asyncio.sleep(1.5)
        accepted = written
        assert not writer.done() and accepted < STREAM_MESSAGES // 2, (
            f"the server took {accepted} of {STREAM_MESSAGES} messages without any reply being read")

        # Reading resumes: every message is answered, in order, and the writer gets through.
        answered = []
        async for reply in call:
            assert not reply.HasField("error"), reply.error.message
            answered.append(reply.request_id.split(":")[0])
        await writer
    assert answered == [str(i) for i in range(STREAM_MESSAGES)]


# --- a request larger than the whole queue ------------------------------------------------------------
def test_batch_larger_than_the_queue_is_invalid_argument_and_not_counted_as_failed(small_queue_server) -> None:
    before = stats(small_queue_server.address)
    with grpc.insecure_channel(small_queue_server.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        batch = pb.ClassifyBatchRequest(images=[pb.ClassifyRequest(image=img) for img in images(SMALL_QUEUE + 1)])
        with pytest.raises(grpc.RpcError) as err:
            stub.ClassifyBatch(batch, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {SMALL_QUEUE}" in err.value.details() and "max_queue_size" in err.value.details()
        assert "split" in err.value.details()
        # One that fits is answered on the same idle server.
        fits = pb.ClassifyBatchRequest(images=list(batch.images[:SMALL_QUEUE]))
        assert len(stub.ClassifyBatch(fits, timeout=30).results) == SMALL_QUEUE
    after = stats(small_queue_server.address)
    assert after.total_requests - before.total_requests == 2  # the refused call is still a request
    assert after.total_images_processed - before.total_images_processed == SMALL_QUEUE
    assert after.failed_predictions == before.failed_predictions
    assert after.success_rate == 100.0


def test_model_infer_larger_than_the_queue_is_invalid_argument_and_not_counted_as_failed(
        small_queue_server) -> None:
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    before = stats(small_queue_server.address)
    pixels = np.zeros((SMALL_QUEUE + 1, 1, 28, 28), np.uint8)
    inp = tritonclient_grpc.InferInput("image", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    client = tritonclient_grpc.InferenceServerClient(small_queue_server.address)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("linear-test", [inp])
    finally:
        client.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"at most {SMALL_QUEUE}" in err.value.message()
    after = stats(small_queue_server.address)
    assert after.total_images_processed == before.total_images_processed
    assert after.failed_predictions == before.failed_predictions


# --- an empty ClassifyBatch ---------------------------------------------------------------------------
def test_empty_batch_is_invalid_argument(inference_server) -> None:
    with grpc.insecure_channel(inference_server.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ClassifyBatch(pb.ClassifyBatchRequest(top_k=3), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no images" in err.value.details()
        assert stub.Classify(pb.ClassifyRequest(image=images(1)[0]), timeout=10).category  # still serving


# --- non-finite FP32 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_fp32_is_invalid_argument(inference_server, bad: float, normalized: bool) -> None:
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    x = np.full((2, 1, 28, 28), 0.5, np.float32)
    x[1, 0, 3, 4] = bad
    inp = tritonclient_grpc.InferInput("image_fp32", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client = tritonclient_grpc.InferenceServerClient(inference_server.address)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("linear-test", [inp], parameters={"normalized": True} if normalized else None)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'image_fp32'" in err.value.message() and "non-finite" in err.value.message()
        good = tritonclient_grpc.InferInput("image_fp32", [1, 1, 28, 28], "FP32")
        good.set_data_from_numpy(x[:1])
        assert client.infer("linear-test", [good]).as_numpy("probabilities").shape == (1, 10)  # still serving
    finally:
        client.close()


def test_contents_and_raw_input_contents_together_are_invalid_argument(inference_server) -> None:
    """Both forms of one input's data in one request: which is meant cannot be told (Triton refuses it too)."""
    service = pytest.importorskip("tritonclient.grpc")
    request = service.service_pb2.ModelInferRequest(model_name="linear-test")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 28, 28])
    tensor.contents.uint_contents.extend([7] * 784)
    request.raw_input_contents.append(bytes(784))
    with grpc.insecure_channel(inference_server.address) as channel:
        stub = service.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "input 'image' has both contents and raw_input_contents: send one"
        request.inputs[0].ClearField("contents")
        assert stub.ModelInfer(request, timeout=30).outputs[0].name == "probabilities"  # one form: answered

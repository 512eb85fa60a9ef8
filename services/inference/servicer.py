"""fashion.v1.InferenceService over gRPC: a thin adapter between protobuf and the Classifier."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

import grpc

from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from services.common.server import ErrorStatuses
from services.inference.batcher import BatcherClosed, QueueFull, RequestTooLarge
from services.inference.classifier import Classification, Classifier, ModelNotReady, TensorRejected
from services.inference.imaging import ImageRejected
from services.inference.processes import PARENT_PID_ENV, is_child
from services.inference.siblings import STARTED_ENV

STREAM_GROUP = 64  # most stream messages decoded and inferred together
STREAM_GROUPS_IN_FLIGHT = 3  # a group forming while earlier ones are classified and written


ERROR_CODES: dict[type[Exception] | tuple[type[Exception], ...], grpc.StatusCode] = {
    (ImageRejected, TensorRejected, RequestTooLarge): grpc.StatusCode.INVALID_ARGUMENT,
    (ModelNotReady, BatcherClosed): grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ERRORS = ErrorStatuses(ERROR_CODES)


def server_instance_id() -> str:
    """GetStats' instance_id: host name, process id and start time of this server. Processes sharing a
    port (FASHION_INFERENCE_PROCESSES > 1) answer their summed counters, so they give their supervisor's."""
    if is_child() and os.environ.get(PARENT_PID_ENV) and os.environ.get(STARTED_ENV):
        pid, started = os.environ[PARENT_PID_ENV], float(os.environ[STARTED_ENV])
    else:
        pid, started = str(os.getpid()), time.time()
    return f"{socket.gethostname()}:{pid}:{started:.3f}"


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, classifier: Classifier) -> None:
        self._classifier = classifier
        self._instance_id = server_instance_id()

    def _response(self, result: Classification | Exception, request_id: str = "") -> pb.ClassifyResponse:
        manifest = self._classifier.manifest
        name, version = (manifest.name, manifest.version) if manifest else ("", "")
        if isinstance(result, Exception):
            code, message = ERRORS.status_for(result) or (grpc.StatusCode.INTERNAL, str(result))
            return pb.ClassifyResponse(model_name=name, model_version=version, request_id=request_id,
                                       error=pb.ImageError(code=code.value[0], message=message))
        return pb.ClassifyResponse(
            category=result.category, confidence=result.confidence,
            top_k=[pb.Category(label=label, index=i, confidence=p) for i, label, p in result.top_k],
            uncertain=result.uncertain, model_name=name, model_version=version,
            latency_ms=result.latency_ms, request_id=request_id,
        )

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        result = await ERRORS.call(context, lambda: self._classifier.classify(request.image, request.top_k))
        return self._response(result, request.request_id)

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> pb.ClassifyBatchResponse:
        images = request.images
        if not images:  # "one result per image": nothing to answer, and most likely a client's mistake
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ClassifyBatch request has no images: "
                                                                  "send at least one in `images`")
        top_ks = [img.top_k or request.top_k for img in images]
        loop = asyncio.get_running_loop()
        start = loop.time()
        requests = max(1, min(request.requests, len(images)))
        results = await ERRORS.call(context, lambda: self._classifier.classify_many(
            [img.image for img in images], top_ks, requests=requests))
        manifest = self._classifier.manifest
        return pb.ClassifyBatchResponse(
            results=[self._response(r, img.request_id) for r, img in zip(results, images, strict=True)],
            model_name=manifest.name if manifest else "", model_version=manifest.version if manifest else "",
            latency_ms=(loop.time() - start) * 1000,
        )

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Responses in request order. Messages that arrive while a group is being classified
        form the next group, so a busy stream is batched without waiting for anything. Reading stays at
        most STREAM_GROUP * STREAM_GROUPS_IN_FLIGHT messages ahead of dispatch, so a client that sends
        without reading the replies is held back by gRPC flow control instead of filling this process."""
        received: asyncio.Queue[pb.ClassifyRequest | None] = asyncio.Queue(STREAM_GROUP * STREAM_GROUPS_IN_FLIGHT)
        groups: asyncio.Queue[tuple[list[pb.ClassifyRequest], asyncio.Task] | None] = asyncio.Queue(
            STREAM_GROUPS_IN_FLIGHT)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await received.put(req)
            except Exception:
                await received.put(None)  # a broken request stream: answer what came, then end with its error
                raise
            await received.put(None)  # the end of the stream

        async def dispatch() -> None:
            ended = False
            while not ended:
                first = await received.get()
                if first is None:
                    break
                group = [first]
                while len(group) < STREAM_GROUP and not received.empty():  # whatever else has arrived
                    if (req := received.get_nowait()) is None:
                        ended = True
                        break
                    group.append(req)
                task = asyncio.ensure_future(self._classifier.classify_many(
                    [r.image for r in group], [r.top_k for r in group], requests=len(group)))
                await groups.put((group, task))
            await groups.put(None)

        reader = asyncio.ensure_future(read())
        dispatcher = asyncio.ensure_future(dispatch())
        try:
            while (item := await groups.get()) is not None:
                group, task = item
                results = await ERRORS.call(context, lambda t=task: t)  # type: ignore[misc]
                for req, r in zip(group, results, strict=True):
                    yield self._response(r, req.request_id)
            await reader
        finally:
            for t in (reader, dispatcher):
                t.cancel()
            while not groups.empty():
                if (pending := groups.get_nowait()) is not None:
                    pending[1].cancel()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        manifest, model = self._classifier.manifest, self._classifier.model
        if manifest is None or model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._classifier.load_error or "model is loading")
            raise AssertionError("unreachable")
        shape = [-1, *manifest.input_shape]
        return pb.ModelInfo(
            name=manifest.name, version=manifest.version, labels=list(manifest.labels),
            description=manifest.description,
            input=pb.TensorSpec(name=manifest.input_name, datatype="FP32", shape=shape, layout=manifest.layout),
            output=pb.TensorSpec(name=manifest.output_name, datatype="FP32", shape=[-1, len(manifest.labels)]),
            color_mode=manifest.color_mode, background=manifest.background, execution_provider=model.provider,
            max_batch_size=self._classifier.settings.max_batch_size, min_confidence=self._classifier.min_confidence,
        )

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        manifest = self._classifier.manifest
        return pb.Stats(**await self._classifier.stats_snapshot(), model_loaded=self._classifier.ready,
                        model_name=manifest.name if manifest else "",
                        model_version=manifest.version if manifest else "",
                        classes=len(manifest.labels) if manifest else 0, model_error=self._classifier.load_error or "",
                        instance_id=self._instance_id)

"""fashion.v1.InferenceService over gRPC: a thin adapter between protobuf and the Classifier."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import grpc

from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from services.common.server import ErrorStatuses
from services.inference.batcher import BatcherClosed, QueueFull
from services.inference.classifier import Classification, Classifier, ModelNotReady, TensorRejected
from services.inference.imaging import ImageRejected

STREAM_GROUP = 64  # most stream messages decoded and inferred together
STREAM_GROUPS_IN_FLIGHT = 3  # a group forming while earlier ones are classified and written


ERROR_CODES: dict[type[Exception] | tuple[type[Exception], ...], grpc.StatusCode] = {
    (ImageRejected, TensorRejected): grpc.StatusCode.INVALID_ARGUMENT,
    (ModelNotReady, BatcherClosed): grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ERRORS = ErrorStatuses(ERROR_CODES)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, classifier: Classifier) -> None:
        self._c = classifier

    def _response(self, r: Classification | Exception, request_id: str = "") -> pb.ClassifyResponse:
        m = self._c.manifest
        name, version = (m.name, m.version) if m else ("", "")
        if isinstance(r, Exception):
            code, message = ERRORS.status_for(r) or (grpc.StatusCode.INTERNAL, str(r))
            return pb.ClassifyResponse(model_name=name, model_version=version, request_id=request_id,
                                       error=pb.ImageError(code=code.value[0], message=message))
        return pb.ClassifyResponse(
            category=r.category, confidence=r.confidence,
            top_k=[pb.Category(label=label, index=i, confidence=p) for i, label, p in r.top_k],
            uncertain=r.uncertain, model_name=name, model_version=version,
            latency_ms=r.latency_ms, request_id=request_id,
        )

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        result = await ERRORS.call(context, lambda: self._c.classify(request.image, request.top_k))
        return self._response(result, request.request_id)

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> pb.ClassifyBatchResponse:
        images = request.images
        ks = [img.top_k or request.top_k for img in images]
        loop = asyncio.get_running_loop()
        start = loop.time()
        requests = max(1, min(request.requests, len(images)))
        results = await ERRORS.call(context, lambda: self._c.classify_many([img.image for img in images], ks,
                                                                           requests=requests))
        m = self._c.manifest
        return pb.ClassifyBatchResponse(
            results=[self._response(r, img.request_id) for r, img in zip(results, images, strict=True)],
            model_name=m.name if m else "", model_version=m.version if m else "",
            latency_ms=(loop.time() - start) * 1000,
        )

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Responses in request order. Messages that arrive while a group is being classified
        form the next group, so a busy stream is batched without waiting for anything."""
        buffered: collections.deque[pb.ClassifyRequest] = collections.deque()
        arrived = asyncio.Event()
        done = False
        groups: asyncio.Queue[tuple[list[pb.ClassifyRequest], asyncio.Task] | None] = asyncio.Queue(
            STREAM_GROUPS_IN_FLIGHT)

        async def read() -> None:
            nonlocal done
            try:
                async for req in request_iterator:
                    buffered.append(req)
                    arrived.set()
            finally:
                done = True
                arrived.set()

        async def dispatch() -> None:
            while True:
                if not buffered:
                    if done:
                        await groups.put(None)
                        return
                    arrived.clear()
                    await arrived.wait()
                    continue
                group = [buffered.popleft() for _ in range(min(STREAM_GROUP, len(buffered)))]
                task = asyncio.ensure_future(self._c.classify_many(
                    [r.image for r in group], [r.top_k for r in group], requests=len(group)))
                await groups.put((group, task))

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
        m, model = self._c.manifest, self._c.model
        if m is None or model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._c.load_error or "model is loading")
            raise AssertionError("unreachable")
        shape = [-1, *m.input_shape]
        return pb.ModelInfo(
            name=m.name, version=m.version, labels=list(m.labels), description=m.description,
            input=pb.TensorSpec(name=m.input_name, datatype="FP32", shape=shape, layout=m.layout),
            output=pb.TensorSpec(name=m.output_name, datatype="FP32", shape=[-1, len(m.labels)]),
            color_mode=m.color_mode, background=m.background, execution_provider=model.provider,
            max_batch_size=self._c.settings.max_batch_size, min_confidence=self._c.min_confidence,
        )

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        m = self._c.manifest
        return pb.Stats(**self._c.stats.snapshot(), model_loaded=self._c.ready,
                        model_name=m.name if m else "", model_version=m.version if m else "",
                        classes=len(m.labels) if m else 0, model_error=self._c.load_error or "")

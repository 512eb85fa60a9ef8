"""KServe V2 / Open Inference Protocol (`inference.GRPCInferenceService`) over the Classifier.

Lets unmodified Triton and KServe clients run the model: inputs in natural units (UINT8 pixels,
FP32 in [0, 1], or encoded image files as BYTES), Triton's classification, streaming
(ModelStreamInfer) and statistics extensions. What the tensors mean is openinference.py's; this
servicer only translates. Requests share the dynamic batcher with fashion.v1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from fashion.kserve.v2 import grpc_service_pb2 as pb
from fashion.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from services import __version__
from services.common.server import ErrorStatuses
from services.common.tensors import TensorError
from services.inference.classifier import Classifier, ModelNotReady
from services.inference.openinference import EXTENSIONS, ModelNotFound, OpenInferenceModel
from services.inference.servicer import ERROR_CODES

log = logging.getLogger(__name__)

STREAM_IN_FLIGHT = 64  # requests of one ModelStreamInfer stream being answered at once

ERRORS = ErrorStatuses({TensorError: grpc.StatusCode.INVALID_ARGUMENT, ModelNotFound: grpc.StatusCode.NOT_FOUND,
                        **ERROR_CODES})


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, classifier: Classifier, server_name: str) -> None:
        self._classifier = classifier
        self._server_name = server_name
        self._served: OpenInferenceModel | None = None

    async def _loaded_model(self) -> OpenInferenceModel:
        """The loaded model as the protocol sees it; ModelNotReady while there is none."""
        manifest = self._classifier.manifest
        if manifest is None:
            raise ModelNotReady(self._classifier.load_error or "model is loading")
        if self._served is None or self._served.manifest is not manifest:
            self._served = OpenInferenceModel(manifest)
        return self._served

    async def _checked_model(self, name: str, version: str) -> OpenInferenceModel:
        """The loaded model, when `name` (and `version`, if given) are its; else ModelNotFound."""
        model = await self._loaded_model()
        model.check(name, version)
        return model

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._classifier.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self._server_name, version=__version__, extensions=list(EXTENSIONS))

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        await ERRORS.call(context, lambda: self._checked_model(request.name, request.version))
        return pb.ModelReadyResponse(ready=self._classifier.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = await ERRORS.call(context, lambda: self._checked_model(request.name, request.version))
        return model.metadata()

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        """Every model's (this one's) statistics, or those of the model `name` asks for; of every
        server process sharing the port, as GetStats."""
        if request.name:
            model = await ERRORS.call(context, lambda: self._checked_model(request.name, request.version))
        else:
            model = await ERRORS.call(context, self._loaded_model)
        statistics = await self._classifier.statistics_snapshot()
        return pb.ModelStatisticsResponse(model_stats=[model.statistics(statistics)])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        manifest = self._classifier.manifest
        if manifest is None:
            return pb.RepositoryIndexResponse()
        ready = self._classifier.ready
        if request.ready and not ready:
            return pb.RepositoryIndexResponse()
        entry = pb.RepositoryIndexResponse.ModelIndex(
            name=manifest.name, version=manifest.version, state="READY" if ready else "UNAVAILABLE",
            reason="" if ready else (self._classifier.load_error or "loading"))
        return pb.RepositoryIndexResponse(models=[entry])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        received_at = time.perf_counter()
        return await ERRORS.call(context, lambda: self._infer(request, received_at))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: one answer per request, in request order; a request that
        fails gets its error_message and the stream goes on. Up to STREAM_IN_FLIGHT requests are
        answered at once, through the same dynamic batcher as every other call."""
        answers: asyncio.Queue[asyncio.Future[pb.ModelStreamInferResponse] | None] = asyncio.Queue(STREAM_IN_FLIGHT)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await answers.put(asyncio.ensure_future(self._stream_answer(request, time.perf_counter())))
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield await answer
            await reader  # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            while not answers.empty():
                if (pending := answers.get_nowait()) is not None:
                    pending.cancel()

    async def _stream_answer(self, request: pb.ModelInferRequest, received_at: float) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, received_at))
        except Exception as exc:
            status = ERRORS.status_for(exc)
            if status is None:
                log.exception("ModelStreamInfer request %r failed", request.id)
                return pb.ModelStreamInferResponse(error_message=f"internal error: {type(exc).__name__}: {exc}")
            return pb.ModelStreamInferResponse(error_message=status[1])

    async def _infer(self, request: pb.ModelInferRequest, received_at: float) -> pb.ModelInferResponse:
        model = await self._checked_model(request.model_name, request.model_version)
        try:
            wanted = model.read(request)
        except TensorError:
            self._classifier.statistics.record_failure(received_at)
            raise
        if wanted.images is not None:
            probs = await self._classifier.infer_images(wanted.images, received_at)
        else:
            assert wanted.rows is not None
            probs = await self._classifier.infer_tensor(wanted.rows, received_at)
        return model.response(request, wanted, probs)

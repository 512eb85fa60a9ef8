"""KServe V2 / Open Inference Protocol (`inference.GRPCInferenceService`) over the Classifier.

Lets unmodified Triton and KServe clients run the model on preprocessed tensors: ModelInfer
takes FP32 input as typed `contents` or `raw_input_contents` and answers with
`raw_output_contents`, as Triton does. Requests share the dynamic batcher with fashion.v1.
"""

from __future__ import annotations

import grpc
import numpy as np

from fashion.kserve.v2 import grpc_service_pb2 as pb
from fashion.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from services import __version__
from services.inference.classifier import Classifier, TensorRejected
from services.inference.model import ModelManifest
from services.inference.servicer import ERRORS

PLATFORM = "onnxruntime_onnx"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, classifier: Classifier, server_name: str) -> None:
        self._classifier = classifier
        self._server_name = server_name

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._classifier.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self._server_name, version=__version__, extensions=[])

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        await self._check_model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self._classifier.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        manifest = await self._check_model(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=manifest.name, versions=[manifest.version], platform=PLATFORM,
            inputs=[tensor(name=manifest.input_name, datatype="FP32", shape=[-1, *manifest.input_shape])],
            outputs=[tensor(name=manifest.output_name, datatype="FP32", shape=[-1, len(manifest.labels)])],
        )

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
        manifest = await self._check_model(request.model_name, request.model_version, context)
        tensor = await ERRORS.call(context, lambda: _read_input(request, manifest.input_name))
        for out in request.outputs:
            if out.name != manifest.output_name:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"unknown output {out.name!r}; the model has {manifest.output_name!r}")
        probs = await ERRORS.call(context, lambda: self._classifier.infer_tensor(tensor))
        return pb.ModelInferResponse(
            model_name=manifest.name, model_version=manifest.version, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(
                name=manifest.output_name, datatype="FP32", shape=list(probs.shape))],
            raw_output_contents=[np.ascontiguousarray(probs, "<f4").tobytes()],
        )

    async def _check_model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> ModelManifest:
        manifest = self._classifier.manifest
        if manifest is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._classifier.load_error or "model is loading")
        assert manifest is not None
        if name != manifest.name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} is not served here; this server has {manifest.name!r}")
        if version and version != manifest.version:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} has no version {version!r}; it has {manifest.version!r}")
        return manifest


async def _read_input(request: pb.ModelInferRequest, input_name: str) -> np.ndarray:
    """The one FP32 input tensor, from raw_input_contents or typed contents."""
    if len(request.inputs) != 1:
        raise TensorRejected(f"expected exactly 1 input ({input_name!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != input_name:
        raise TensorRejected(f"unknown input {tensor.name!r}; the model's input is {input_name!r}")
    if tensor.datatype != "FP32":
        raise TensorRejected(f"input {tensor.name!r} must be FP32, not {tensor.datatype or 'unset'}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 1 for d in shape):
        raise TensorRejected(f"input shape {list(shape)} must be fully specified and positive")
    count = int(np.prod(shape)) if shape else 0
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise TensorRejected(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        raw = request.raw_input_contents[0]
        if len(raw) != count * 4:
            raise TensorRejected(f"raw input has {len(raw)} bytes; shape {list(shape)} FP32 needs {count * 4}")
        return np.frombuffer(raw, "<f4").reshape(shape)
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise TensorRejected(f"input has {len(values)} fp32_contents; shape {list(shape)} needs {count}")
    return np.asarray(values, np.float32).reshape(shape)

"""Clients of the Inference service's KServe V2 / Open Inference Protocol API
(`inference.GRPCInferenceService`), sync and asyncio, on the same channel options (address, TLS,
token, deadlines, retries) as the other clients. Requests and answers are the messages of
`fashion.kserve.v2.grpc_service_pb2`; what the model's inputs are, ModelMetadata says.

    from fashion.client import KServeClient
    from fashion.kserve.v2 import grpc_service_pb2 as kserve

    with KServeClient("localhost:50051") as client:
        request = kserve.ModelInferRequest(model_name="fashion-mnist-cnn")
        request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
        print(client.model_infer(request).outputs)

Not imported by `import fashion.client` until used: the generated messages register the protocol's
`inference.*` names, as tritonclient's do, and a program may use tritonclient beside our clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from fashion.client._base import AsyncServiceClient, ServiceClient
from fashion.client._channel import ChannelOptions
from fashion.kserve.v2 import grpc_service_pb2 as pb
from fashion.kserve.v2 import grpc_service_pb2_grpc as pb_grpc

SERVICE = "inference.GRPCInferenceService"


class KServeClient(ServiceClient[pb_grpc.GRPCInferenceServiceStub]):
    """Blocking client. Errors raise grpc.RpcError with the server's status and message
    (INVALID_ARGUMENT for a tensor that does not fit, NOT_FOUND for another model, ...)."""

    def __init__(self, address: str | ChannelOptions = "localhost:50051") -> None:
        super().__init__(address, pb_grpc.GRPCInferenceServiceStub)

    def server_live(self, timeout_s: float | None = None) -> bool:
        return self._stub.ServerLive(pb.ServerLiveRequest(), **self._kw(timeout_s)).live

    def server_ready(self, timeout_s: float | None = None) -> bool:
        return self._stub.ServerReady(pb.ServerReadyRequest(), **self._kw(timeout_s)).ready

    def server_metadata(self, timeout_s: float | None = None) -> pb.ServerMetadataResponse:
        return self._stub.ServerMetadata(pb.ServerMetadataRequest(), **self._kw(timeout_s))

    def model_ready(self, name: str, version: str = "", timeout_s: float | None = None) -> bool:
        return self._stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), **self._kw(timeout_s)).ready

    def model_metadata(self, name: str, version: str = "", timeout_s: float | None = None) -> pb.ModelMetadataResponse:
        return self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), **self._kw(timeout_s))

    def model_infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None) -> pb.ModelInferResponse:
        return self._stub.ModelInfer(request, **self._kw(timeout_s))

    def model_stream_infer(self, requests: Iterable[pb.ModelInferRequest],
                           timeout_s: float | None = None) -> Iterator[pb.ModelStreamInferResponse]:
        """One answer per request, in order; a failed request's answer has its error_message."""
        return self._stub.ModelStreamInfer(iter(requests), **self._kw(timeout_s))

    def model_statistics(self, name: str = "", version: str = "",
                         timeout_s: float | None = None) -> pb.ModelStatisticsResponse:
        """Statistics of model `name` (every model: "")."""
        return self._stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version),
                                          **self._kw(timeout_s))

    def repository_index(self, ready: bool = False, timeout_s: float | None = None) -> pb.RepositoryIndexResponse:
        return self._stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), **self._kw(timeout_s))


class AsyncKServeClient(AsyncServiceClient[pb_grpc.GRPCInferenceServiceStub]):
    """asyncio client with the same methods as KServeClient, awaitable."""

    def __init__(self, address: str | ChannelOptions = "localhost:50051") -> None:
        super().__init__(address, pb_grpc.GRPCInferenceServiceStub)

    async def server_live(self, timeout_s: float | None = None) -> bool:
        return (await self._stub.ServerLive(pb.ServerLiveRequest(), **self._kw(timeout_s))).live

    async def server_ready(self, timeout_s: float | None = None) -> bool:
        return (await self._stub.ServerReady(pb.ServerReadyRequest(), **self._kw(timeout_s))).ready

    async def server_metadata(self, timeout_s: float | None = None) -> pb.ServerMetadataResponse:
        return await self._stub.ServerMetadata(pb.ServerMetadataRequest(), **self._kw(timeout_s))

    async def model_ready(self, name: str, version: str = "", timeout_s: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return (await self._stub.ModelReady(request, **self._kw(timeout_s))).ready

    async def model_metadata(self, name: str, version: str = "",
                             timeout_s: float | None = None) -> pb.ModelMetadataResponse:
        return await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version),
                                              **self._kw(timeout_s))

    async def model_infer(self, request: pb.ModelInferRequest,
                          timeout_s: float | None = None) -> pb.ModelInferResponse:
        return await self._stub.ModelInfer(request, **self._kw(timeout_s))

    async def model_stream_infer(self, requests: AsyncIterable[pb.ModelInferRequest] | Iterable[pb.ModelInferRequest],
                                 timeout_s: float | None = None) -> AsyncIterator[pb.ModelStreamInferResponse]:
        call = self._stub.ModelStreamInfer(requests, **self._kw(timeout_s))
        async for response in call:
            yield response

    async def model_statistics(self, name: str = "", version: str = "",
                               timeout_s: float | None = None) -> pb.ModelStatisticsResponse:
        return await self._stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version),
                                                **self._kw(timeout_s))

    async def repository_index(self, ready: bool = False,
                               timeout_s: float | None = None) -> pb.RepositoryIndexResponse:
        return await self._stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), **self._kw(timeout_s))


__all__ = ["SERVICE", "AsyncKServeClient", "KServeClient"]

"""Clients of the Inference service (fashion.v1.InferenceService), sync and asyncio."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc

from fashion.client._base import AsyncServiceClient, ServiceClient
from fashion.client._channel import ChannelOptions
from fashion.client.imagefile import MESSAGE_OVERHEAD, read_image_file
from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc

SERVICE = "fashion.v1.InferenceService"


def image_error_code(error: pb.ImageError) -> grpc.StatusCode:
    """The status code of one failed image of a ClassifyBatch or ClassifyStream answer."""
    return next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)


def _request(image: bytes | str | Path, limit: int, top_k: int = 0, request_id: str = "") -> pb.ClassifyRequest:
    """A path is read with read_image_file: a FIFO or a file over `limit` raises ImageFileError at once."""
    data = image if isinstance(image, bytes) else read_image_file(image, limit)
    return pb.ClassifyRequest(image=data, top_k=top_k, request_id=request_id)


def _batch(images: Iterable[bytes | str | Path | pb.ClassifyRequest], limit: int, top_k: int,
           requests: int) -> pb.ClassifyBatchRequest:
    reqs = [img if isinstance(img, pb.ClassifyRequest) else _request(img, limit, request_id=str(i))
            for i, img in enumerate(images)]
    return pb.ClassifyBatchRequest(images=reqs, top_k=top_k, requests=requests)


def _image_limit(options: ChannelOptions) -> int:
    """The most bytes of one image file read for a call: what the channel's largest message can carry."""
    return options.max_message_bytes - MESSAGE_OVERHEAD


class InferenceClient(ServiceClient[pb_grpc.InferenceServiceStub]):
    """Blocking client. Images are bytes or file paths. Errors raise grpc.RpcError with the
    server's status code and message (INVALID_ARGUMENT for unusable images, ...); a path that is no
    regular file, or one over what a call can carry, raises ImageFileError before any call."""

    def __init__(self, address: str | ChannelOptions = "localhost:50051") -> None:
        super().__init__(address, pb_grpc.InferenceServiceStub)

    def classify(self, image: bytes | str | Path, top_k: int = 0,
                 timeout_s: float | None = None) -> pb.ClassifyResponse:
        return self._stub.Classify(_request(image, _image_limit(self.options), top_k), **self._kw(timeout_s))

    def classify_batch(self, images: Iterable[bytes | str | Path | pb.ClassifyRequest], top_k: int = 0,
                       timeout_s: float | None = None, requests: int = 0) -> pb.ClassifyBatchResponse:
        """One result per image, in order. Images are bytes, paths, or ClassifyRequest messages
        (sent as they are: a top_k of their own). `requests`: how many client requests the images
        stand for in the service's statistics (0: this one)."""
        return self._stub.ClassifyBatch(_batch(images, _image_limit(self.options), top_k, requests),
                                        **self._kw(timeout_s))

    def classify_stream(self, requests: Iterable[pb.ClassifyRequest],
                        timeout_s: float | None = None) -> Iterator[pb.ClassifyResponse]:
        return self._stub.ClassifyStream(iter(requests), **self._kw(timeout_s))

    def model_info(self, timeout_s: float | None = None) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout_s))

    def stats(self, timeout_s: float | None = None) -> pb.Stats:
        return self._stub.GetStats(pb.GetStatsRequest(), **self._kw(timeout_s))


class AsyncInferenceClient(AsyncServiceClient[pb_grpc.InferenceServiceStub]):
    """asyncio client with the same methods as InferenceClient, awaitable."""

    def __init__(self, address: str | ChannelOptions = "localhost:50051") -> None:
        super().__init__(address, pb_grpc.InferenceServiceStub)

    async def classify(self, image: bytes | str | Path, top_k: int = 0,
                       timeout_s: float | None = None) -> pb.ClassifyResponse:
        return await self._stub.Classify(_request(image, _image_limit(self.options), top_k),
                                         **self._kw(timeout_s))

    async def classify_batch(self, images: Iterable[bytes | str | Path | pb.ClassifyRequest], top_k: int = 0,
                             timeout_s: float | None = None, requests: int = 0) -> pb.ClassifyBatchResponse:
        return await self._stub.ClassifyBatch(_batch(images, _image_limit(self.options), top_k, requests),
                                              **self._kw(timeout_s))

    async def classify_stream(self, requests: AsyncIterable[pb.ClassifyRequest] | Iterable[pb.ClassifyRequest],
                              timeout_s: float | None = None) -> AsyncIterator[pb.ClassifyResponse]:
        call = self._stub.ClassifyStream(requests, **self._kw(timeout_s))
        async for response in call:
            yield response

    async def model_info(self, timeout_s: float | None = None) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout_s))

    async def stats(self, timeout_s: float | None = None) -> pb.Stats:
        return await self._stub.GetStats(pb.GetStatsRequest(), **self._kw(timeout_s))


__all__ = ["SERVICE", "AsyncInferenceClient", "InferenceClient"]

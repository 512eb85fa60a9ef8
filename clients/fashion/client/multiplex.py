"""Many concurrent single-image classifications over a few long-lived ClassifyStream calls.

A unary Classify per image costs a full RPC on both sides; a stream costs one message, and the
Inference service classifies the messages that arrive together as one batch. A front end that
receives independent requests (the REST gateway) gets the stream's throughput with the unary
call's interface:

    mux = ClassifyMultiplexer(AsyncInferenceClient(options))
    result = await mux.classify(image_bytes, top_k=3)    # raises grpc.aio.AioRpcError like Classify

Each request has its own deadline. Streams are replaced every `recycle_s` (new ones are opened
through the channel's load balancing, so several Inference replicas share the load); a request
whose stream broke (a replica going away) is retried once as a unary Classify, with the channel's
retry policy. Calls that must carry their own trace context should use Classify itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import grpc

from fashion.client.inference import AsyncInferenceClient
from fashion.v1 import inference_pb2 as pb

_DRAIN_S = 60.0  # a replaced stream's deadline beyond its replacement: its last requests finish


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error shaped like the one a unary call raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Stream:
    """One ClassifyStream call: a queue of requests out, futures resolved by request_id in."""

    def __init__(self, client: AsyncInferenceClient, lifetime_s: float) -> None:
        self.opened = time.monotonic()
        self.pending: dict[str, asyncio.Future[pb.ClassifyResponse]] = {}
        self._out: asyncio.Queue[pb.ClassifyRequest | None] = asyncio.Queue()
        self.alive = True
        responses = client.classify_stream(self._requests(), timeout_s=lifetime_s + _DRAIN_S)
        self._reader = asyncio.ensure_future(self._read(responses))

    async def _requests(self) -> AsyncIterator[pb.ClassifyRequest]:
        while (request := await self._out.get()) is not None:
            yield request

    async def _read(self, responses: AsyncIterator[pb.ClassifyResponse]) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the classification stream ended")
        try:
            async for response in responses:
                future = self.pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, "the client was closed")
        finally:
            self.alive = False
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()

    def send(self, request: pb.ClassifyRequest) -> asyncio.Future[pb.ClassifyResponse]:
        future: asyncio.Future[pb.ClassifyResponse] = asyncio.get_running_loop().create_future()
        self.pending[request.request_id] = future
        self._out.put_nowait(request)
        return future

    def finish(self) -> None:
        """Half-close: the server answers what it has, then ends the call."""
        self.alive = False
        self._out.put_nowait(None)

    async def close(self) -> None:
        self.finish()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class ClassifyMultiplexer:
    """Single-image Classify semantics over `streams` shared ClassifyStream calls."""

    def __init__(self, client: AsyncInferenceClient, streams: int = 2, recycle_s: float = 30.0,
                 max_in_flight: int = 1024) -> None:
        self.client = client
        self._slots: list[_Stream | None] = [None] * max(1, streams)
        self._next = itertools.cycle(range(len(self._slots)))
        self._ids = itertools.count()
        self._recycle_s = recycle_s
        self._room = asyncio.Semaphore(max_in_flight)
        self._retired: set[_Stream] = set()

    def _stream(self) -> _Stream:
        slot = next(self._next)
        stream = self._slots[slot]
        if stream is None or not stream.alive or time.monotonic() - stream.opened > self._recycle_s:
            if stream is not None:
                stream.finish()
                self._retire(stream)
            stream = self._slots[slot] = _Stream(self.client, self._recycle_s)
        return stream

    def _retire(self, stream: _Stream) -> None:
        self._retired.add(stream)
        stream._reader.add_done_callback(lambda _: self._retired.discard(stream))

    async def classify(self, image: bytes, top_k: int = 0, timeout_s: float | None = None) -> pb.ClassifyResponse:
        """Like AsyncInferenceClient.classify: the answer, or grpc.aio.AioRpcError with the image's
        status (INVALID_ARGUMENT for an unusable image, DEADLINE_EXCEEDED, UNAVAILABLE, ...)."""
        timeout = timeout_s or self.client.options.timeout_s
        request = pb.ClassifyRequest(image=image, top_k=top_k, request_id=str(next(self._ids)))
        async with self._room:
            future = self._stream().send(request)
            try:
                response = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # The stream broke (e.g. its replica went away): once more as a unary call,
                # which the channel retries with backoff.
                return await self.client.classify(image, top_k=top_k, timeout_s=timeout)
        if response.HasField("error"):
            code = next((c for c in grpc.StatusCode if c.value[0] == response.error.code), grpc.StatusCode.UNKNOWN)
            raise rpc_error(code, response.error.message)
        return response

    async def close(self) -> None:
        for stream in [*self._slots, *self._retired]:
            if stream is not None:
                await stream.close()
        self._slots = [None] * len(self._slots)

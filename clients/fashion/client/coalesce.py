"""Many concurrent single-image classifications sent together as ClassifyBatch calls.

A front end that receives independent requests (the REST gateway) pays a full RPC per image with
Classify, on both sides. The coalescer keeps at most `max_calls` calls in flight; requests that
arrive meanwhile wait and leave together in the next ClassifyBatch call, when a call ends or, beside
the calls in flight, once `min_beside` of them wait. A lone request (nothing waiting, no call in
flight) leaves at once as a Classify call of its own (no timer, no batch framing: one user at a
time pays nothing for the coalescing), and under load the calls grow on their own:

    coalescer = ClassifyCoalescer(AsyncInferenceClient(options))
    result = await coalescer.classify(image_bytes, top_k=3)  # raises grpc.aio.AioRpcError like Classify

Each image keeps its own answer or error (ClassifyBatch fails images one by one) and its own
deadline; a call that fails as a whole (UNAVAILABLE after the channel's retries, ...) fails its
images with that error. With several Inference replicas behind a round-robin channel, raise
`max_calls` so that every replica has a call. Calls carry no per-request trace context: requests
that must continue a trace should use Classify itself.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc

from fashion.client.inference import AsyncInferenceClient, image_error_code
from fashion.v1 import inference_pb2 as pb

FRAMING_BYTES = 64 * 1024  # room for the message's other fields under max_message_bytes


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error shaped like the one a unary call raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _expire(future: asyncio.Future[pb.ClassifyResponse]) -> None:
    if not future.done():
        future.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class _Waiting:
    __slots__ = ("deadline", "future", "request")

    def __init__(self, request: pb.ClassifyRequest, deadline: float, future: asyncio.Future[pb.ClassifyResponse]):
        self.request = request
        self.deadline = deadline
        self.future = future


class ClassifyCoalescer:
    """Single-image Classify semantics over at most `max_calls` ClassifyBatch calls at a time, each
    with at most `max_batch` images and `max_message_bytes` (the channel's) of them."""

    def __init__(self, client: AsyncInferenceClient, max_calls: int = 3, max_batch: int = 64,
                 max_waiting: int = 4096, min_beside: int = 8) -> None:
        if max_calls < 1 or max_batch < 1 or min_beside < 1:
            raise ValueError("max_calls, max_batch and min_beside must be at least 1")
        self.client = client
        self.max_calls = max_calls
        self.max_batch = max_batch
        self.min_beside = min_beside
        """Images that must be waiting before a call starts beside one in flight (with none in flight,
        a call starts with whatever waits): under load, a call that just ended would otherwise be
        followed at once by one of the one or two images that arrived meanwhile."""
        self.max_waiting = max_waiting
        self._max_bytes = max(1, client.options.max_message_bytes - FRAMING_BYTES)
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._calls: dict[asyncio.Task[None], list[_Waiting]] = {}
        self._lone_calls = 0  # Classify calls of lone requests in flight (they count against max_calls)

    async def classify(self, image: bytes, top_k: int = 0, timeout_s: float | None = None) -> pb.ClassifyResponse:
        """Like AsyncInferenceClient.classify: the answer, or grpc.aio.AioRpcError with the image's
        status (INVALID_ARGUMENT for an unusable image, DEADLINE_EXCEEDED, UNAVAILABLE, ...)."""
        if len(self._waiting) >= self.max_waiting:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{len(self._waiting)} classifications already waiting for a call")
        timeout = timeout_s or self.client.options.timeout_s
        if not self._waiting and not self._calls and not self._lone_calls:
            self._lone_calls += 1
            try:
                return await self.client.classify(image, top_k=top_k, timeout_s=timeout)
            finally:
                self._lone_calls -= 1
                self._launch()  # what arrived meanwhile
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.ClassifyResponse] = loop.create_future()
        self._waiting.append(_Waiting(pb.ClassifyRequest(image=image, top_k=top_k), time.monotonic() + timeout,
                                      future))
        # A bare timer rather than asyncio.timeout (a context manager and task bookkeeping per image):
        # when it fires, the future fails and _launch skips it.
        expiry = loop.call_later(timeout, _expire, future)
        self._launch()
        try:
            response = await future
        finally:
            expiry.cancel()
        if response.HasField("error"):
            raise rpc_error(image_error_code(response.error), response.error.message)
        return response

    def _launch(self) -> None:
        """Start calls while there is room, each taking what is waiting (oldest first)."""
        while self._waiting and len(self._calls) + self._lone_calls < self.max_calls:
            if (self._calls or self._lone_calls) and len(self._waiting) < self.min_beside:
                return  # a call is in flight: what waits leaves when it ends, or once enough have gathered
            group: list[_Waiting] = []
            size = 0
            while self._waiting and len(group) < self.max_batch:
                item = self._waiting[0]
                if item.future.done():  # the caller gave up (deadline, disconnect) before its call
                    self._waiting.popleft()
                    continue
                if group and size + len(item.request.image) > self._max_bytes:
                    break
                self._waiting.popleft()
                group.append(item)
                size += len(item.request.image)
            if not group:
                return
            call = asyncio.ensure_future(self._call(group))
            self._calls[call] = group
            call.add_done_callback(self._finished)

    def _finished(self, call: asyncio.Task[None]) -> None:
        # A call cancelled (by close) before or while it ran leaves its images to fail here.
        unanswered = [w for w in self._calls.pop(call) if not w.future.done()]
        if unanswered:
            error = rpc_error(grpc.StatusCode.CANCELLED, "the client was closed") if call.cancelled() else \
                rpc_error(grpc.StatusCode.INTERNAL, f"ClassifyBatch failed: {call.exception()!r}")
            for w in unanswered:
                w.future.set_exception(error)
        self._launch()

    async def _call(self, group: list[_Waiting]) -> None:
        timeout = max(w.deadline for w in group) - time.monotonic()
        try:
            # Each image is a request of its own in the service's statistics (GetStats, /stats).
            response = await self.client.classify_batch([w.request for w in group], timeout_s=max(timeout, 0.001),
                                                        requests=len(group))
        except grpc.aio.AioRpcError as exc:
            error: grpc.aio.AioRpcError = exc
        except Exception as exc:  # e.g. a message over the channel's limit, refused before sending
            error = rpc_error(grpc.StatusCode.INTERNAL, f"ClassifyBatch failed: {exc}")
        else:
            if len(response.results) == len(group):
                for w, r in zip(group, response.results, strict=True):
                    if not w.future.done():
                        w.future.set_result(r)
                return
            error = rpc_error(grpc.StatusCode.INTERNAL,
                              f"ClassifyBatch answered {len(response.results)} results for {len(group)} images")
        for w in group:
            if not w.future.done():
                w.future.set_exception(error)

    async def close(self) -> None:
        """Fail what is still waiting, cancel the calls in flight."""
        closed = rpc_error(grpc.StatusCode.CANCELLED, "the client was closed")
        while self._waiting:
            item = self._waiting.popleft()
            if not item.future.done():
                item.future.set_exception(closed)
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

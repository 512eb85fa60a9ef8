"""Classifying a job's images through the Inference service, waiting out its outages.

When the Inference service is unreachable, restarting or overloaded, calls fail with a transient
status; every caller then waits while one probe retries (grpc.health.v1) with exponential
backoff, and the calls are sent again once it answers SERVING. The job's files are not touched
meanwhile. Statuses that waiting cannot fix (bad credentials, unknown method) end the job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fashion.client import AsyncInferenceClient
from fashion.client.inference import SERVICE
from fashion.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
})
_IMAGE_REJECTED = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class InferenceRefused(RuntimeError):
    """The Inference service refused the job's calls for a reason that waiting will not fix."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class ImageAnswer:
    """The Inference service's answer for one image: a category, or why the image is unusable."""

    category: str = ""
    confidence: float = 0.0
    uncertain: bool = False
    error: str = ""


class RemoteClassifier:
    """ClassifyBatch calls with outage handling; `on_wait(reason, delay_s)` and `on_ready()` report
    the transitions (the runner turns them into the job's WAITING and RUNNING states)."""

    def __init__(self, client: AsyncInferenceClient, timeout_s: float, retry_initial_s: float, retry_max_s: float,
                 on_wait: Callable[[str, float], None], on_ready: Callable[[], None]) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._on_wait = on_wait
        self._on_ready = on_ready
        self._up = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None

    async def wait_ready(self) -> pb.ModelInfo:
        """Wait until the Inference service is SERVING; its model's information."""
        delay = self._retry_initial_s
        while True:
            try:
                if await self._client.health(SERVICE, timeout_s=5.0) == "SERVING":
                    info = await self._client.model_info(timeout_s=10.0)
                    self._up.set()
                    return info
                reason = "NOT_SERVING (model loading)"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in TRANSIENT:
                    raise InferenceRefused(exc.code(), exc.details() or "") from None
                reason = f"{exc.code().name}: {exc.details()}"
            self._on_wait(reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def classify(self, images: list[bytes]) -> list[ImageAnswer]:
        """One verdict per image, in order; returns only once the Inference service answered."""
        while True:
            await self._up.wait()
            try:
                resp = await self._client.classify_batch(images, top_k=1, timeout_s=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in TRANSIENT or _too_large(exc):
                    raise InferenceRefused(exc.code(), exc.details() or "") from None
                self._went_down(f"{exc.code().name}: {exc.details()}")
                continue
            # An image error other than INVALID_ARGUMENT is the server's failure, not the image's: retry.
            server_side = [r.error for r in resp.results if r.HasField("error") and r.error.code != _IMAGE_REJECTED]
            if len(resp.results) != len(images) or server_side:
                why = server_side[0].message if server_side else f"{len(resp.results)} results for {len(images)}"
                self._went_down(f"Inference service failed to classify: {why}")
                continue
            return [ImageAnswer(error=r.error.message) if r.HasField("error")
                    else ImageAnswer(r.category, r.confidence, r.uncertain) for r in resp.results]

    def _went_down(self, reason: str) -> None:
        if self._up.is_set():
            self._up.clear()
            self._probe = asyncio.ensure_future(self._wait_back(reason))

    async def _wait_back(self, reason: str) -> None:
        delay = self._retry_initial_s
        while True:
            self._on_wait(reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)
            try:
                status = await self._client.health(SERVICE, timeout_s=5.0)
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                continue
            if status == "SERVING":
                self._up.set()
                self._on_ready()
                return
            reason = f"{status} (model loading)"

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


def _too_large(exc: grpc.aio.AioRpcError) -> bool:
    """A message over a size limit is refused again however long we wait: lower FASHION_BATCH_CHUNK_BYTES
    or raise FASHION_MAX_MESSAGE_BYTES on both services."""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (exc.details() or "")

"""The gateway's gRPC clients: one channel per service, shared by every request."""

from __future__ import annotations

from dataclasses import dataclass

from fashion.client import AsyncInferenceClient, AsyncKServeClient
from fashion.client.batch import AsyncBatchClient
from fashion.client.coalesce import ClassifyCoalescer
from fashion.client.monitor import AsyncMonitorClient
from fashion.v1 import inference_pb2 as pb
from services.common.config import GatewaySettings
from services.common.security import client_options


@dataclass
class Backends:
    """The gateway's clients, one channel per service, created inside the event loop."""

    inference: AsyncInferenceClient
    kserve: AsyncKServeClient
    """The Inference service's KServe V2 API, which the /v2 routes forward to."""
    batch: AsyncBatchClient
    monitor: AsyncMonitorClient
    predictions: ClassifyCoalescer | None
    """Single-image predictions sent together as ClassifyBatch calls (None: a Classify call each)."""

    @classmethod
    def connect(cls, settings: GatewaySettings) -> Backends:
        def options(address: str):  # type: ignore[no-untyped-def]
            return client_options(settings, address, timeout_s=settings.gateway_timeout_s)

        inference = AsyncInferenceClient(options(settings.inference_address))
        calls = settings.gateway_classify_calls
        return cls(inference, AsyncKServeClient(options(settings.inference_address)),
                   AsyncBatchClient(options(settings.batch_address)),
                   AsyncMonitorClient(options(settings.monitor_address)),
                   ClassifyCoalescer(inference, calls) if calls else None)

    async def classify(self, image: bytes, top_k: int, own_call: bool) -> pb.ClassifyResponse:
        """One image, sent with the others waiting; in a Classify call of its own when `own_call`
        (a request that continues a trace: the trace goes on through its call)."""
        if own_call or self.predictions is None:
            return await self.inference.classify(image, top_k=top_k)
        return await self.predictions.classify(image, top_k=top_k)

    async def close(self) -> None:
        if self.predictions is not None:
            await self.predictions.close()
        for client in (self.inference, self.kserve, self.batch, self.monitor):
            await client.close()

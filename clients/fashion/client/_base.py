"""What every service client shares: the channel, deadlines, token metadata, health checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fashion.client._channel import ChannelOptions, aio_channel, sync_channel

StubT = TypeVar("StubT")
HEALTH_TIMEOUT_S = 5.0


def _options(address: str | ChannelOptions) -> ChannelOptions:
    return address if isinstance(address, ChannelOptions) else ChannelOptions.from_env(address)


def _status_name(resp: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class ServiceClient(Generic[StubT]):
    """Blocking client base: `self._stub` is the service's stub on a configured channel."""

    def __init__(self, address: str | ChannelOptions, stub: Callable[[grpc.Channel], StubT]) -> None:
        self.options = _options(address)
        self._channel = sync_channel(self.options)
        self._stub = stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _kw(self, timeout_s: float | None) -> dict[str, object]:
        """Per-call deadline (the options' default unless given) and token metadata."""
        return {"timeout": timeout_s or self.options.timeout_s, "metadata": self.options.metadata}

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... (raises grpc.RpcError when unreachable)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout_s or HEALTH_TIMEOUT_S)
        return _status_name(resp)


class AsyncServiceClient(Generic[StubT]):
    """asyncio client base: the same as ServiceClient on an aio channel."""

    def __init__(self, address: str | ChannelOptions, stub: Callable[[grpc.aio.Channel], StubT]) -> None:
        self.options = _options(address)
        self._channel = aio_channel(self.options)
        self._stub = stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _kw(self, timeout_s: float | None) -> dict[str, object]:
        return {"timeout": timeout_s or self.options.timeout_s, "metadata": self.options.metadata}

    async def health(self, service: str = "", timeout_s: float | None = None) -> str:
        resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=timeout_s or HEALTH_TIMEOUT_S)
        return _status_name(resp)

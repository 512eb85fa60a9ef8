"""Clients of the Monitor service (fashion.v1.MonitorService), sync and asyncio."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fashion.client._channel import ChannelOptions, aio_channel, sync_channel
from fashion.v1 import monitor_pb2 as pb
from fashion.v1 import monitor_pb2_grpc as pb_grpc

SERVICE = "fashion.v1.MonitorService"
# Reports render charts: allow more than the default deadline.
REPORT_TIMEOUT_S = 120.0


class MonitorClient:
    """Blocking client. Errors raise grpc.RpcError with the server's status code and message
    (INVALID_ARGUMENT for out-of-range arguments, UNAVAILABLE when the Batch service is down, ...)."""

    def __init__(self, address: str | ChannelOptions = "localhost:50053") -> None:
        self.options = address if isinstance(address, ChannelOptions) else ChannelOptions.from_env(address)
        self._channel = sync_channel(self.options)
        self._stub = pb_grpc.MonitorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _kw(self, timeout_s: float | None) -> dict[str, object]:
        return {"timeout": timeout_s or self.options.timeout_s, "metadata": self.options.metadata}

    def system_health(self, timeout_s: float | None = None) -> pb.SystemHealth:
        return self._stub.GetSystemHealth(pb.GetSystemHealthRequest(), **self._kw(timeout_s))

    def batch_health(self, days: int = 0, timeout_s: float | None = None) -> pb.BatchHealth:
        return self._stub.GetBatchHealth(pb.GetBatchHealthRequest(days=days), **self._kw(timeout_s))

    def generate_report(self, chart_days: int = 0, text_only: bool = False,
                        timeout_s: float | None = REPORT_TIMEOUT_S) -> pb.Report:
        return self._stub.GenerateReport(pb.GenerateReportRequest(chart_days=chart_days, text_only=text_only),
                                         **self._kw(timeout_s))

    def alerts(self, history_limit: int = 0, rule: str = "", timeout_s: float | None = None) -> pb.ListAlertsResponse:
        return self._stub.ListAlerts(pb.ListAlertsRequest(history_limit=history_limit, rule=rule),
                                     **self._kw(timeout_s))

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... (raises grpc.RpcError when unreachable)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s or 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncMonitorClient:
    """asyncio client with the same methods as MonitorClient, awaitable."""

    def __init__(self, address: str | ChannelOptions = "localhost:50053") -> None:
        self.options = address if isinstance(address, ChannelOptions) else ChannelOptions.from_env(address)
        self._channel = aio_channel(self.options)
        self._stub = pb_grpc.MonitorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncMonitorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _kw(self, timeout_s: float | None) -> dict[str, object]:
        return {"timeout": timeout_s or self.options.timeout_s, "metadata": self.options.metadata}

    async def system_health(self, timeout_s: float | None = None) -> pb.SystemHealth:
        return await self._stub.GetSystemHealth(pb.GetSystemHealthRequest(), **self._kw(timeout_s))

    async def batch_health(self, days: int = 0, timeout_s: float | None = None) -> pb.BatchHealth:
        return await self._stub.GetBatchHealth(pb.GetBatchHealthRequest(days=days), **self._kw(timeout_s))

    async def generate_report(self, chart_days: int = 0, text_only: bool = False,
                              timeout_s: float | None = REPORT_TIMEOUT_S) -> pb.Report:
        return await self._stub.GenerateReport(pb.GenerateReportRequest(chart_days=chart_days, text_only=text_only),
                                               **self._kw(timeout_s))

    async def alerts(self, history_limit: int = 0, rule: str = "",
                     timeout_s: float | None = None) -> pb.ListAlertsResponse:
        return await self._stub.ListAlerts(pb.ListAlertsRequest(history_limit=history_limit, rule=rule),
                                           **self._kw(timeout_s))

    async def health(self, service: str = "", timeout_s: float | None = None) -> str:
        resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s or 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


__all__ = ["SERVICE", "AsyncMonitorClient", "MonitorClient", "grpc"]

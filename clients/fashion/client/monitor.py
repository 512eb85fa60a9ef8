"""Clients of the Monitor service (fashion.v1.MonitorService), sync and asyncio."""

from __future__ import annotations

import grpc

from fashion.client._base import AsyncServiceClient, ServiceClient
from fashion.client._channel import ChannelOptions
from fashion.v1 import batch_pb2
from fashion.v1 import monitor_pb2 as pb
from fashion.v1 import monitor_pb2_grpc as pb_grpc

SERVICE = "fashion.v1.MonitorService"
# Reports render charts: allow more than the default deadline.
REPORT_TIMEOUT_S = 120.0


class MonitorClient(ServiceClient[pb_grpc.MonitorServiceStub]):
    """Blocking client. Errors raise grpc.RpcError with the server's status code and message
    (INVALID_ARGUMENT for out-of-range arguments, UNAVAILABLE when the Batch service is down, ...)."""

    def __init__(self, address: str | ChannelOptions = "localhost:50053") -> None:
        super().__init__(address, pb_grpc.MonitorServiceStub)

    def system_health(self, timeout_s: float | None = None) -> pb.SystemHealth:
        return self._stub.GetSystemHealth(pb.GetSystemHealthRequest(), **self._kw(timeout_s))

    def batch_health(self, days: int = 0, timeout_s: float | None = None) -> batch_pb2.BatchHealth:
        return self._stub.GetBatchHealth(batch_pb2.GetBatchHealthRequest(days=days), **self._kw(timeout_s))

    def generate_report(self, chart_days: int = 0, text_only: bool = False,
                        timeout_s: float | None = REPORT_TIMEOUT_S) -> pb.Report:
        return self._stub.GenerateReport(pb.GenerateReportRequest(chart_days=chart_days, text_only=text_only),
                                         **self._kw(timeout_s))

    def alerts(self, history_limit: int = 0, rule: str = "", timeout_s: float | None = None) -> pb.ListAlertsResponse:
        return self._stub.ListAlerts(pb.ListAlertsRequest(history_limit=history_limit, rule=rule),
                                     **self._kw(timeout_s))

    def send_test_alert(self, channel: str = "", timeout_s: float | None = None) -> pb.SendTestAlertResponse:
        """A test notification through the Monitor's notifiers (all, or "email" / "slack"), sent now."""
        return self._stub.SendTestAlert(pb.SendTestAlertRequest(channel=channel), **self._kw(timeout_s))


class AsyncMonitorClient(AsyncServiceClient[pb_grpc.MonitorServiceStub]):
    """asyncio client with the same methods as MonitorClient, awaitable."""

    def __init__(self, address: str | ChannelOptions = "localhost:50053") -> None:
        super().__init__(address, pb_grpc.MonitorServiceStub)

    async def system_health(self, timeout_s: float | None = None) -> pb.SystemHealth:
        return await self._stub.GetSystemHealth(pb.GetSystemHealthRequest(), **self._kw(timeout_s))

    async def batch_health(self, days: int = 0, timeout_s: float | None = None) -> batch_pb2.BatchHealth:
        return await self._stub.GetBatchHealth(batch_pb2.GetBatchHealthRequest(days=days), **self._kw(timeout_s))

    async def generate_report(self, chart_days: int = 0, text_only: bool = False,
                              timeout_s: float | None = REPORT_TIMEOUT_S) -> pb.Report:
        return await self._stub.GenerateReport(pb.GenerateReportRequest(chart_days=chart_days, text_only=text_only),
                                               **self._kw(timeout_s))

    async def alerts(self, history_limit: int = 0, rule: str = "",
                     timeout_s: float | None = None) -> pb.ListAlertsResponse:
        return await self._stub.ListAlerts(pb.ListAlertsRequest(history_limit=history_limit, rule=rule),
                                           **self._kw(timeout_s))


__all__ = ["SERVICE", "AsyncMonitorClient", "MonitorClient", "grpc"]

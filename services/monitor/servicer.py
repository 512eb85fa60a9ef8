"""fashion.v1.MonitorService over gRPC: a thin adapter between protobuf and the Monitor."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from fashion.v1 import batch_pb2, health_pb2
from fashion.v1 import monitor_pb2 as pb
from fashion.v1 import monitor_pb2_grpc as pb_grpc
from services.common.server import ErrorStatuses
from services.monitor.dashboard import ReportDiskFull, ReportNotWritten
from services.monitor.health import BatchHealthResult, BatchUnavailable, Health, ServiceCheck, SystemCheck
from services.monitor.monitor import InvalidRequest, Monitor, NotConfigured, TestDelivery
from services.monitor.store import AlertRecord, HistoryEntry

HEALTH = {Health.HEALTHY: health_pb2.HEALTH_STATUS_HEALTHY, Health.DEGRADED: health_pb2.HEALTH_STATUS_DEGRADED,
          Health.UNHEALTHY: health_pb2.HEALTH_STATUS_UNHEALTHY}


ERRORS = ErrorStatuses({
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ReportDiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,  # before its base class: the first match wins
    ReportNotWritten: grpc.StatusCode.FAILED_PRECONDITION,
    NotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    BatchUnavailable: grpc.StatusCode.UNAVAILABLE,
})


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    async def GetSystemHealth(self, request: pb.GetSystemHealthRequest,
                              context: grpc.aio.ServicerContext) -> pb.SystemHealth:
        system = await self._monitor.system_health()
        active = await asyncio.to_thread(self._monitor.active_alerts)
        return system_health_pb(system, len(active or []))

    async def GetBatchHealth(self, request: batch_pb2.GetBatchHealthRequest,
                             context: grpc.aio.ServicerContext) -> batch_pb2.BatchHealth:
        result = await ERRORS.call(context, lambda: self._monitor.batch_health(request.days))
        return batch_health_pb(result)

    async def GenerateReport(self, request: pb.GenerateReportRequest,
                             context: grpc.aio.ServicerContext) -> pb.Report:
        files, status = await ERRORS.call(
            context, lambda: self._monitor.generate_report(request.chart_days, request.text_only))
        return pb.Report(text_path=str(files.text_path.absolute()),
                         html_path=str(files.html_path.absolute()) if files.html_path else "",
                         chart_paths=[str(p.absolute()) for p in files.chart_paths], text=files.text,
                         status=HEALTH[status], generated_at=_ts(files.generated_at.timestamp()))

    async def ListAlerts(self, request: pb.ListAlertsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListAlertsResponse:
        async def listing():  # type: ignore[no-untyped-def]
            return await asyncio.to_thread(self._monitor.list_alerts, request.history_limit, request.rule)

        result = await ERRORS.call(context, listing)
        return pb.ListAlertsResponse(
            active=[alert_pb(a) for a in result.active],
            history=[event_pb(e) for e in result.history],
            rules=[pb.AlertRuleInfo(rule=r.name, title=r.title, severity=_severity(r.severity),
                                    condition=r.condition, enabled=r.enabled) for r in result.rules],
            pending_notifications=result.pending_notifications,
        )


# --- domain → protobuf ---------------------------------------------------------------------------

    async def SendTestAlert(self, request: pb.SendTestAlertRequest,
                            context: grpc.aio.ServicerContext) -> pb.SendTestAlertResponse:
        results = await ERRORS.call(context, lambda: asyncio.to_thread(self._monitor.send_test_alert,
                                                                       request.channel))
        return test_alert_pb(results)

def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _severity(name: str) -> pb.Severity.ValueType:
    return pb.Severity.Value(f"SEVERITY_{name}")


def service_pb(s: ServiceCheck) -> pb.ServiceHealth:
    msg = pb.ServiceHealth(name=s.name, address=s.address, status=HEALTH[s.status], serving_status=s.serving_status,
                           message=s.message, latency_ms=s.latency_ms, checked_at=_ts(s.checked_at.timestamp()))
    if s.inference_stats is not None:
        msg.inference_stats.CopyFrom(s.inference_stats)
    if s.batch_stats is not None:
        msg.batch_stats.CopyFrom(s.batch_stats)
    return msg


def system_health_pb(system: SystemCheck, active_alerts: int) -> pb.SystemHealth:
    return pb.SystemHealth(
        status=HEALTH[system.status], services=[service_pb(s) for s in system.services],
        disks=[pb.DiskSpace(path=d.label, total_bytes=d.total_bytes, free_bytes=d.free_bytes,
                            free_percent=d.free_percent, folder_bytes=d.folder_bytes) for d in system.disks],
        checked_at=_ts(system.checked_at.timestamp()), active_alerts=active_alerts)


def batch_health_pb(result: BatchHealthResult) -> batch_pb2.BatchHealth:
    """The Batch service's own answer, passed on."""
    if result.report is not None:
        return result.report
    return batch_pb2.BatchHealth(status=HEALTH[result.status], message=result.message, recent_run=result.recent_run,
                                 max_age_hours=result.max_age_hours, recent_errors=result.recent_errors,
                                 stats=result.stats, success_rate_min=result.success_rate_min,
                                 checked_at=_ts(result.checked_at.timestamp()))


def alert_pb(a: AlertRecord) -> pb.Alert:
    msg = pb.Alert(rule=a.rule, title=a.title, severity=_severity(a.severity),
                   state=pb.ALERT_STATE_FIRING if a.state == "firing" else pb.ALERT_STATE_RESOLVED,
                   message=a.message, value=a.value, threshold=a.threshold, notified=a.notified)
    for name in ("started_at", "updated_at", "resolved_at"):
        value = getattr(a, name)
        if value is not None:
            getattr(msg, name).CopyFrom(_ts(value))
    return msg


def event_pb(e: HistoryEntry) -> pb.AlertEvent:
    return pb.AlertEvent(rule=e.rule, title=e.title, severity=_severity(e.severity), kind=e.kind, message=e.message,
                         at=_ts(e.at), notified=e.notified)


def test_alert_pb(results: list[TestDelivery]) -> pb.SendTestAlertResponse:
    return pb.SendTestAlertResponse(results=[
        pb.NotificationResult(channel=r.channel, destination=r.destination, delivered=r.delivered, error=r.error)
        for r in results])

"""The Monitor service process: fashion.v1.MonitorService, health and reflection on one gRPC port,
Prometheus metrics on their own HTTP port, and two background tasks: the periodic health check
with alert evaluation, and the notification delivery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from fashion.v1 import monitor_pb2 as pb
from fashion.v1 import monitor_pb2_grpc as pb_grpc
from services.common import server as grpc_server
from services.common.config import MonitorSettings, load_settings
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.security import metrics_token_check
from services.common.tracing import setup_tracing, shutdown_tracing
from services.monitor.monitor import Monitor
from services.monitor.notifiers import NotificationError, build_notifiers
from services.monitor.rules import build_rules
from services.monitor.servicer import MonitorServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["MonitorService"].full_name,)


async def serve(settings: MonitorSettings | None = None) -> None:
    """Run the Monitor service until SIGTERM/SIGINT."""
    settings = settings or MonitorSettings()
    setup_logging(settings, "monitor")
    setup_tracing("fashion-monitor")  # before any channel: the checks carry trace context
    start_metrics_server("monitor", settings.monitor_metrics_port, settings.listen_host(settings.monitor_host),
                         metrics_token_check(settings))

    monitor = Monitor.service(settings)
    server = grpc_server.create_server(settings, "monitor", [
        (pb_grpc.add_MonitorServiceServicer_to_server, MonitorServicer(monitor))])
    health = await grpc_server.add_health_and_reflection(server, SERVICE_NAMES, settings.reflection)
    address = settings.listen_address(settings.monitor_host, settings.monitor_port)
    await grpc_server.bind(server, settings, address, health)
    await server.start()
    await grpc_server.set_serving(health, SERVICE_NAMES, True)
    log.info("Monitor service listening on %s: checking %s and %s every %gs; state in %s",
             address, settings.inference_address, settings.batch_address, settings.monitor_check_interval_s,
             settings.monitor_state_db)
    assert monitor.outbox is not None
    tasks = [asyncio.ensure_future(monitor.run_evaluations()), asyncio.ensure_future(monitor.outbox.run())]
    if settings.report_cron:
        tasks.append(asyncio.ensure_future(monitor.run_scheduled_reports()))
        log.info("Scheduled report: %s (to %s)", settings.report_cron, ", ".join(monitor.outbox.notifiers) or "nobody")

    async def on_stop() -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await monitor.close()
        shutdown_tracing()

    await grpc_server.serve_until_signal(server, health, settings.shutdown_grace_s, on_stop)


def main() -> None:
    settings = load_settings(MonitorSettings)
    try:  # a wrong setting stops the start with the reason, before anything listens
        build_rules(settings)
        build_notifiers(settings)
    except (ValueError, NotificationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    asyncio.run(serve(settings))

"""The Monitor's checks and report run in this process, without a Monitor server (`fashion monitor
health|dashboard --embedded`, and the fallback when the Monitor service does not answer): the same
Monitor, reading the Inference and Batch services over gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fashion.v1 import batch_pb2
from fashion.v1 import monitor_pb2 as pb
from services.common.config import MonitorSettings, load_settings
from services.monitor.health import BatchUnavailable
from services.monitor.monitor import InvalidRequest, Monitor, NotConfigured
from services.monitor.servicer import HEALTH, batch_health_pb, system_health_pb, test_alert_pb


def health(days: int) -> tuple[pb.SystemHealth, batch_pb2.BatchHealth | None, str]:
    """System health, batch health (None with the reason when the Batch service did not answer)."""
    settings = load_settings(MonitorSettings)

    async def check() -> tuple[pb.SystemHealth, batch_pb2.BatchHealth | None, str]:
        monitor = Monitor.embedded(settings)
        try:
            system = await monitor.system_health()
            active = monitor.active_alerts()
            try:
                batch, error = batch_health_pb(await monitor.batch_health(days)), ""
            except BatchUnavailable as exc:
                batch, error = None, str(exc)
            return system_health_pb(system, len(active or [])), batch, error
        finally:
            await monitor.close()

    return asyncio.run(check())


def report(days: int | None, text_only: bool, output_dir: Path | None) -> pb.Report:
    """Write the monitoring report (text, and unless `text_only` PNG charts and the HTML page) into
    `output_dir` (default FASHION_REPORT_DIR)."""
    overrides = {"report_dir": output_dir} if output_dir is not None else {}
    settings = load_settings(MonitorSettings, **overrides)

    async def generate() -> pb.Report:
        monitor = Monitor.embedded(settings)
        try:
            files, status = await monitor.generate_report(days or 0, text_only)
        finally:
            await monitor.close()
        written = pb.Report(text_path=str(files.text_path.absolute()), text=files.text, status=HEALTH[status],
                            html_path=str(files.html_path.absolute()) if files.html_path else "",
                            chart_paths=[str(p.absolute()) for p in files.chart_paths])
        written.generated_at.FromDatetime(files.generated_at)
        return written

    return asyncio.run(generate())


def test_alert(channel: str) -> pb.SendTestAlertResponse:
    """Send a test notification from this process, with the notifier settings of its environment. Raises
    ValueError when the channel is unknown or not configured."""
    settings = load_settings(MonitorSettings)
    try:
        return test_alert_pb(Monitor.embedded(settings).send_test_alert(channel))
    except (InvalidRequest, NotConfigured) as exc:
        raise ValueError(str(exc)) from None

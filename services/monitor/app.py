"""The Monitor service process: fashion.v1.MonitorService (health and reflection beside it) on one
gRPC port, Prometheus metrics on their own HTTP port, and background tasks: the periodic health
check with alert evaluation, the notification delivery, and the scheduled report. The process
around it is services.common.bootstrap's."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

from fashion.v1 import monitor_pb2_grpc as pb_grpc
from services.common.bootstrap import GrpcService, Listener, ServiceParts, StartupError, run
from services.common.config import MonitorSettings
from services.monitor.monitor import Monitor
from services.monitor.notifiers import NotificationError, build_notifiers
from services.monitor.rules import build_rules
from services.monitor.servicer import MonitorServicer
from services.monitor.store import MonitorStore

log = logging.getLogger(__name__)


def check(settings: MonitorSettings) -> None:
    """Unknown alert rules, notifiers that cannot work and an alert state file that cannot be opened for
    writing stop the start, with the reason."""
    try:
        build_rules(settings)
        build_notifiers(settings)
    except (ValueError, NotificationError) as exc:
        raise StartupError(str(exc)) from exc
    check_state_file(settings.monitor_state_db)


def check_state_file(path: Path) -> None:
    """Open (creating it if new) the alert state file as the service will, so that a folder it may not
    write, a full disk or a file that is no database is one line naming the file and its setting, not a
    traceback after the start."""
    try:
        store = MonitorStore(path)
        try:
            store.check_writable()
        finally:
            store.close()
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise StartupError(f"cannot open the alert state file {path} (FASHION_MONITOR_STATE_DB): "
                           f"{exc.strerror or exc}{where}") from None
    except sqlite3.Error as exc:
        folder = path.parent
        hint = (f"; its folder {folder} is not writable by this user" if folder.is_dir()
                and not os.access(folder, os.W_OK | os.X_OK) else "")
        raise StartupError(f"cannot open the alert state file {path} (FASHION_MONITOR_STATE_DB): {exc}{hint}") \
            from None


class MonitorParts(ServiceParts):
    """The monitor (checks, alert state, outbox) and its background tasks."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.monitor = Monitor.service(settings)
        self.servicers = [(pb_grpc.add_MonitorServiceServicer_to_server, MonitorServicer(self.monitor))]
        self.tasks: list[asyncio.Future[None]] = []
        self.delivery: asyncio.Future[None] | None = None

    def describe(self) -> str:
        s = self.settings
        return (f"checking {s.inference_address} and {s.batch_address} every {s.monitor_check_interval_s:g}s; "
                f"state in {s.monitor_state_db}")

    async def start(self) -> None:
        outbox = self.monitor.outbox
        assert outbox is not None
        self.delivery = asyncio.ensure_future(outbox.run())
        self.tasks = [asyncio.ensure_future(self.monitor.run_evaluations()), self.delivery]
        if self.settings.report_cron:
            self.tasks.append(asyncio.ensure_future(self.monitor.run_scheduled_reports()))
            log.info("Scheduled report: %s (to %s)", self.settings.report_cron, ", ".join(outbox.notifiers) or "nobody")

    async def stop(self) -> None:
        """Cancel the checks and reports; stop the delivery cooperatively, waiting (up to one notifier
        timeout) for a notification being sent to be recorded as sent, so the restart does not send it
        again (cancelling would leave its worker thread sending while the store closes)."""
        if self.monitor.outbox is not None:
            self.monitor.outbox.stop()
        for task in self.tasks:
            if task is not self.delivery:
                task.cancel()
        if self.delivery is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.delivery), timeout=self.settings.notify_timeout_s)
            except TimeoutError:
                log.warning("A notification was still being delivered after %.1f s: stopping anyway; it may be "
                            "sent again after the restart", self.settings.notify_timeout_s)
                self.delivery.cancel()
            except Exception:  # run() never raises; if it did, the store still has to close
                log.exception("Notification delivery ended with an error")
        await asyncio.gather(*self.tasks, return_exceptions=True)  # all ended: cancelled, or run() returned
        await self.monitor.close()


SERVICE = GrpcService(
    name="monitor", settings_class=MonitorSettings, log_name="monitor",
    listener=lambda s: Listener(s.monitor_host, s.monitor_port, s.monitor_metrics_port),
    build=MonitorParts, check=check,
)


def main() -> None:
    run(SERVICE)

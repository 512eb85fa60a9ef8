"""The Monitor's one data plane: system and batch health, reports, alerts. The gRPC servicer and
the CLI's embedded mode (`fashion monitor dashboard|health --embedded`) both call it, so a report
made without the Monitor service is the same report."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

from services.common import metrics
from services.common.config import MonitorSettings
from services.monitor.alerting import AlertEngine
from services.monitor.dashboard import Dashboard, ReportData, ReportFiles, ReportNotWritten
from services.monitor.health import (
    STATS_DAYS,
    BatchHealthResult,
    BatchUnavailable,
    Health,
    SystemCheck,
    SystemChecker,
    worst,
)
from services.monitor.notifiers import Notification, NotificationError, NotificationOutbox, build_notifiers
from services.monitor.rules import AlertRule, ApiStatsWindow, Observation, build_rules
from services.monitor.store import AlertRecord, HistoryEntry, MonitorStore

log = logging.getLogger(__name__)

MAX_DAYS = 366
MAX_HISTORY = 10_000
DEFAULT_HISTORY = 50
REPORT_CLOCK_CHECK_S = 60.0
"""Longest wait between two readings of the wall clock while a scheduled report is due later."""


CHANNELS = ("email", "slack")


class NotConfigured(Exception):
    """No notifier of the asked channel is configured."""


@dataclass(frozen=True)
class TestDelivery:
    """How one notifier delivered the test alert."""

    channel: str
    destination: str
    delivered: bool
    error: str = ""


class InvalidRequest(ValueError):
    """A caller's argument is out of range; the message names it."""


MAX_QUOTED_CHARS = 64
"""Characters of a caller's string quoted back in an error: a whole megabyte would not fit the status's
metadata (the caller would get RESOURCE_EXHAUSTED about metadata instead of the reason) nor a log line."""


def quoted(value: str) -> str:
    """`value` as an error message quotes it: repr(), cut to MAX_QUOTED_CHARS with its length said."""
    if len(value) <= MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:MAX_QUOTED_CHARS]!r}... ({len(value):,} characters)"


@dataclass(frozen=True)
class AlertListing:
    active: list[AlertRecord]
    history: list[HistoryEntry]
    rules: list[AlertRule]
    pending_notifications: int


class Monitor:
    """Service mode (`Monitor.service`): owns the state file, evaluates the rules and delivers
    notifications. Embedded mode (`Monitor.embedded`): checks and reports only, reading the alert
    state file when one exists on this machine."""

    def __init__(self, settings: MonitorSettings, store: MonitorStore | None, evaluating: bool) -> None:
        self.settings = settings
        self.store = store
        self.checker = SystemChecker(settings)
        self.rules = build_rules(settings)
        self.dashboard = Dashboard(settings.report_dir, settings.alert_success_rate_min, settings.alert_min_images,
                                   settings.retention_days)
        self.window = ApiStatsWindow(settings.alert_api_window_s)
        self.engine: AlertEngine | None = None
        self.outbox: NotificationOutbox | None = None
        if evaluating:
            assert store is not None
            notifiers = build_notifiers(settings)
            self.engine = AlertEngine(self.rules, store, list(notifiers), settings.alert_cooldown_s,
                                      settings.alert_confirm_checks)
            self.outbox = NotificationOutbox(store, notifiers, settings)
            self.monitoring_since = float(store.meta_setdefault("first_started_at", repr(time.time())))
            log.info("Alert rules: %s; notifiers: %s", ", ".join(r.name for r in self.rules if r.enabled),
                     ", ".join(notifiers) or "none (set FASHION_SMTP_HOST or FASHION_SLACK_WEBHOOK_URL)")

    @classmethod
    def service(cls, settings: MonitorSettings) -> Monitor:
        return cls(settings, MonitorStore(settings.monitor_state_db), evaluating=True)

    @classmethod
    def embedded(cls, settings: MonitorSettings) -> Monitor:
        path = settings.monitor_state_db
        store = None
        if path.exists():
            try:
                store = MonitorStore(path, read_only=True)
            except sqlite3.Error as exc:
                log.warning("Cannot open the alert state in %s: %s", path, exc)
        return cls(settings, store, evaluating=False)

    async def close(self) -> None:
        await self.checker.close()
        if self.store is not None:
            self.store.close()

    # --- queries ---
    def active_alerts(self) -> list[AlertRecord] | None:
        if self.engine is not None:
            return self.engine.active()
        if self.store is not None:
            try:
                return [r for r in self.store.records().values() if r.state == "firing"]
            except sqlite3.Error as exc:  # embedded mode reads another process's file: never fatal
                log.warning("Cannot read the alert state in %s: %s", self.store.path, exc)
        return None

    async def system_health(self) -> SystemCheck:
        return await self.checker.check()

    async def batch_health(self, days: int = 0) -> BatchHealthResult:
        """Raises InvalidRequest for a bad window, BatchUnavailable when the Batch service is down."""
        days = days or STATS_DAYS
        if not 1 <= days <= MAX_DAYS:
            raise InvalidRequest(f"days must be between 1 and {MAX_DAYS}, got {days}")
        return await self.checker.batch_health(days)

    async def generate_report(self, chart_days: int = 0, text_only: bool = False) -> tuple[ReportFiles, Health]:
        chart_days = chart_days or self.settings.report_chart_days
        if not 1 <= chart_days <= MAX_DAYS:
            raise InvalidRequest(f"chart_days must be between 1 and {MAX_DAYS}, got {chart_days}")
        system = await self.checker.check(with_sizes=True)
        week = system.batch.batch_stats
        history, batch_error = None, system.batch.message
        if week is not None:
            try:
                history = week if chart_days == STATS_DAYS else await self.checker.batch_stats(chart_days)
            except BatchUnavailable as exc:
                batch_error = str(exc)
        bh = None
        if week is not None:
            try:
                bh = await self.checker.batch_health(STATS_DAYS)
            except BatchUnavailable as exc:
                batch_error = str(exc)
        alerts = await asyncio.to_thread(self.active_alerts)
        data = ReportData(datetime.now().astimezone(), system, bh, history, alerts, batch_error)
        files = await asyncio.to_thread(self.dashboard.write, data, text_only)
        status = worst(system.status, bh.status) if bh else system.status
        log.info("Report written: %s (%s)", files.text_path, status)
        return files, status

    def send_test_alert(self, channel: str = "") -> list[TestDelivery]:
        """Blocking (the notifiers' network calls). Sends a test notification through the configured
        notifiers (all, or `channel`'s) now, bypassing the outbox, and says how each went. Raises
        InvalidRequest for an unknown channel, NotConfigured when no notifier of it is configured."""
        if channel and channel not in CHANNELS:
            raise InvalidRequest(f"channel must be one of {', '.join(CHANNELS)}, got {quoted(channel)}")
        notifiers = build_notifiers(self.settings)
        chosen = {name: n for name, n in notifiers.items() if not channel or name == channel}
        if not chosen:
            what = {"email": "FASHION_SMTP_HOST and FASHION_SMTP_TO",
                    "slack": "FASHION_SLACK_WEBHOOK_URL or FASHION_SLACK_WEBHOOK_URL_FILE"}
            wanted = [channel] if channel else list(CHANNELS)
            raise NotConfigured(f"no {' or '.join(wanted)} notifier is configured (set "
                                f"{' or '.join(what[c] for c in wanted)})")
        now = time.time()
        notification = Notification(
            rule="test_alert", title="Test alert from the Fashion Classifier monitor", severity="INFO", kind="fired",
            message="A test notification sent with `fashion monitor test-alert`: alerts reach you here.",
            at=now, started_at=now, condition="sent on request", host=socket.gethostname())
        results = []
        for name, notifier in chosen.items():
            try:
                notifier.send(notification)
            except NotificationError as exc:
                log.warning("Test alert through %s failed: %s", name, exc)
                results.append(TestDelivery(name, notifier.destination, False, str(exc)))
            else:
                log.info("Test alert sent through %s", name)
                results.append(TestDelivery(name, notifier.destination, True))
        return results

    def list_alerts(self, history_limit: int = 0, rule: str = "") -> AlertListing:
        """Blocking (SQLite). Raises InvalidRequest for a bad limit or an unknown rule."""
        if not 0 <= history_limit <= MAX_HISTORY:
            raise InvalidRequest(f"history_limit must be between 0 and {MAX_HISTORY}, got {history_limit}")
        names = [r.name for r in self.rules]
        if rule and rule not in names:
            raise InvalidRequest(f"unknown rule {quoted(rule)}; rules are {', '.join(names)}")
        active = [a for a in self.active_alerts() or [] if not rule or a.rule == rule]
        if self.store is None:
            return AlertListing(active, [], self.rules, 0)
        history = self.store.history(history_limit or DEFAULT_HISTORY, rule)
        return AlertListing(active, history, self.rules, self.store.outbox_size())

    # --- the periodic evaluation ---
    async def evaluate_once(self) -> SystemCheck:
        assert self.engine is not None and self.outbox is not None
        system = await self.checker.check(with_drift=True)
        now = time.time()
        stats = system.inference.inference_stats
        window = self.window.add(now, stats) if stats is not None else None
        obs = Observation(system, window, self.monitoring_since, now)
        if await asyncio.to_thread(self.engine.evaluate, obs):
            self.outbox.wake()
        return system

    async def run_scheduled_reports(self) -> None:
        """Write the dashboard and send the text report (HTML attached to the email) at each time of
        FASHION_REPORT_CRON, until cancelled: the daily `dashboard.py && mail` cron job
        of the monitoring guide (docs/monitoring-and-logging-guide.md).

        The wall clock is read at least every REPORT_CLOCK_CHECK_S while waiting, so a clock that is
        set (NTP, a resumed virtual machine) moves the report with it; one that jumps past several due
        times sends one report, not one per time missed, and one set back never repeats a report."""
        assert self.store is not None and self.outbox is not None
        cron = self.settings.report_cron
        last_due = datetime.now()
        while True:
            due = croniter(cron, last_due).get_next(datetime)
            last_due = max(due, await _wall_clock_reaches(due))
            try:
                files, status = await self.generate_report()
                title = f"Monitoring Report {files.generated_at:%Y-%m-%d %H:%M} ({status})"
                text = Notification("report", title, "INFO", "report", files.text, time.time(), time.time(),
                                    attachment=str(files.html_path or "")).to_json()
                await asyncio.to_thread(self.store.enqueue, [(n, text) for n in self.outbox.notifiers])
                self.outbox.wake()
            except ReportNotWritten as exc:  # a full or read-only report folder: one line says which
                log.error("Scheduled report not written: %s; the next one runs at its time", exc)
            except Exception:
                log.exception("Scheduled report failed; the next one runs at its time")

    async def run_evaluations(self) -> None:
        """Check and evaluate every monitor_check_interval_s until cancelled; a failed cycle is
        logged and the next one runs on time."""
        interval = self.settings.monitor_check_interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                system = await self.evaluate_once()
                metrics.MONITOR_EVALUATIONS.labels("ok").inc()
                log.debug("Checked: inference %s, batch %s", system.inference.status, system.batch.status)
            except Exception:
                metrics.MONITOR_EVALUATIONS.labels("failed").inc()
                log.exception("Health check and alert evaluation failed")
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:  # a slow cycle: skip the missed ticks instead of running them back to back
                next_at, delay = loop.time() + interval, interval
            await asyncio.sleep(delay)


async def _wall_clock_reaches(due: datetime) -> datetime:
    """Sleep until the wall clock shows `due` or later, reading it at least every REPORT_CLOCK_CHECK_S
    (asyncio sleeps on the monotonic clock, which a clock set forward or back does not move); the time then."""
    while True:
        now = datetime.now()
        if now >= due:
            return now
        await asyncio.sleep(min(REPORT_CLOCK_CHECK_S, (due - now).total_seconds()))

"""The alert engine: per rule a small state machine (ok → pending → firing → ok) that fires once per
incident, holds repeats back for a cooldown, sends a resolution when the condition clears, and
keeps its state in SQLite so a restart neither forgets nor repeats an alert. The rules themselves
are rules.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

from services.common import metrics
from services.monitor.notifiers import Notification
from services.monitor.rules import AlertRule, Observation, RuleResult, Severity
from services.monitor.store import AlertRecord, HistoryEntry, MonitorStore

log = logging.getLogger(__name__)

# ERROR and CRITICAL alerts also land in logs/monitor_errors.log.
LOG_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.ERROR: logging.ERROR,
             Severity.CRITICAL: logging.ERROR}


class AlertEngine:
    """Evaluates the rules on each observation and records transitions, queueing notifications in
    the same transaction. Not thread-safe: one evaluation at a time (the app's periodic task)."""

    def __init__(self, rules: list[AlertRule], store: MonitorStore, notifier_names: list[str],
                 cooldown_s: float, confirm_checks: int) -> None:
        self.rules = rules
        self.store = store
        self.notifier_names = notifier_names
        self.cooldown_s = cooldown_s
        self.confirm_checks = confirm_checks
        self.host = socket.gethostname()
        self._lock = threading.Lock()  # evaluate() runs in a worker thread while ListAlerts reads
        self.records = store.records()
        for record in self.records.values():
            if record.state == "firing":
                metrics.MONITOR_ALERT_FIRING.labels(record.rule, record.severity).set(1)

    def evaluate(self, obs: Observation) -> int:
        """Apply every enabled rule; returns how many notifications were queued. A rule that raises
        is logged and skipped, never stopping the others."""
        queued = 0
        for rule in self.rules:
            if not rule.enabled:
                continue
            try:
                result = rule.check(obs)
            except Exception:
                log.exception("Alert rule %s failed to evaluate", rule.name)
                continue
            with self._lock:
                queued += self._apply(rule, result, obs.at)
        return queued

    def active(self) -> list[AlertRecord]:
        """Copies of the firing alerts (safe to read while an evaluation runs)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self.records.values() if r.state == "firing"]

    def _apply(self, rule: AlertRule, result: RuleResult, now: float) -> int:
        record = self.records.get(rule.name) or AlertRecord(rule.name, rule.title, rule.severity)
        self.records[rule.name] = record
        record.title, record.severity, record.threshold = rule.title, rule.severity, rule.threshold
        if result.firing is None:
            return 0
        if not result.firing:
            return self._clear(rule, record, result, now)
        record.message, record.value, record.updated_at = result.message, result.value, now
        event = None
        if record.state != "firing":
            record.pending_checks += 1
            if record.pending_checks < self.confirm_checks:
                record.state = "pending"
                self.store.save(record)
                return 0
            record.state, record.started_at, record.resolved_at, record.notified = "firing", now, None, False
            metrics.MONITOR_ALERT_FIRING.labels(rule.name, rule.severity).set(1)
            event = HistoryEntry(0, rule.name, rule.title, rule.severity, "fired", result.message, now, False)
        cooling = record.last_notified_at is not None and now - record.last_notified_at < self.cooldown_s
        if record.notified or cooling:
            if event is not None:
                log.warning("Alert %s fired (notification held back by the cooldown): %s", rule.name, result.message)
            self.store.save(record, event)
            return 0
        record.notified, record.last_notified_at = True, now
        notification = self._notification(rule, record, "fired", now)
        mark = record.fired_event_id if event is None else None  # a held-back incident now sent
        if event is not None:
            event = HistoryEntry(0, rule.name, rule.title, rule.severity, "fired", result.message, now, True)
        log.log(LOG_LEVEL[rule.severity], "Alert %s fired [%s]: %s", rule.name, rule.severity, result.message)
        self.store.save(record, event, [(n, notification) for n in self.notifier_names], mark_notified=mark)
        return len(self.notifier_names)

    def _clear(self, rule: AlertRule, record: AlertRecord, result: RuleResult, now: float) -> int:
        if record.state == "pending":
            record.state, record.pending_checks = "ok", 0
            self.store.save(record)
            return 0
        if record.state != "firing":
            return 0
        record.state, record.pending_checks, record.resolved_at, record.updated_at = "ok", 0, now, now
        record.message, record.value = result.message, result.value
        metrics.MONITOR_ALERT_FIRING.labels(rule.name, rule.severity).set(0)
        event = HistoryEntry(0, rule.name, rule.title, rule.severity, "resolved", result.message, now, record.notified)
        # Only an incident people were told about gets a resolution.
        notifications = []
        if record.notified:
            text = self._notification(rule, record, "resolved", now)
            notifications = [(n, text) for n in self.notifier_names]
        log.info("Alert %s resolved: %s", rule.name, result.message)
        self.store.save(record, event, notifications)
        return len(notifications)

    def _notification(self, rule: AlertRule, record: AlertRecord, kind: str, now: float) -> str:
        return Notification(rule.name, rule.title, rule.severity, kind, record.message, now,
                            record.started_at or now, rule.condition, self.host).to_json()

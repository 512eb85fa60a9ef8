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
import time
from collections.abc import Sequence

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
        self._retire_unevaluated(time.time())
        enabled = {r.name: r for r in rules if r.enabled}
        for record in self.records.values():
            rule = enabled.get(record.rule)
            if rule is None or record.state != "firing":
                continue
            # FASHION_ALERT_SEVERITY may have changed since the alert fired: its series moves to the new label.
            if record.severity != rule.severity:
                metrics.MONITOR_ALERT_FIRING.remove(record.rule, record.severity)
                record.severity = rule.severity
            metrics.MONITOR_ALERT_FIRING.labels(record.rule, record.severity).set(1)

    def evaluate(self, obs: Observation) -> int:
        """Apply every enabled rule; returns how many notifications were queued. A rule that raises,
        or whose new state cannot be saved, is logged and skipped, never stopping the others; its alert
        stays as it was and the next evaluation tries again."""
        queued = 0
        with self._lock:
            self._retire_unevaluated(obs.at)  # those whose resolution could not be saved at the start
        for rule in self.rules:
            if not rule.enabled:
                continue
            try:
                result = rule.check(obs)
            except Exception:
                log.exception("Alert rule %s failed to evaluate", rule.name)
                continue
            try:
                with self._lock:
                    queued += self._apply(rule, result, obs.at)
            except Exception:
                log.exception("Alert rule %s: its new state could not be saved in %s; it is tried again at the"
                              " next check", rule.name, self.store.path)
        return queued

    def active(self) -> list[AlertRecord]:
        """Copies of the firing alerts (safe to read while an evaluation runs)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self.records.values() if r.state == "firing"]

    def _retire_unevaluated(self, now: float) -> None:
        """Resolve the alerts of rules no longer evaluated (disabled, or unknown to this version), which
        would otherwise stay firing forever. The history records the end; nobody is notified: whoever
        disabled the rule asked not to hear about it."""
        enabled = {r.name for r in self.rules if r.enabled}
        known = {r.name for r in self.rules}
        for name, record in list(self.records.items()):
            if name in enabled or record.state == "ok":
                continue
            updated = dataclasses.replace(record, state="ok", pending_checks=0)
            event = None
            if record.state == "firing":
                reason = ("rule disabled (FASHION_ALERT_DISABLED_RULES); no longer evaluated" if name in known
                          else "rule no longer exists; no longer evaluated")
                updated.message, updated.resolved_at, updated.updated_at = reason, now, now
                event = HistoryEntry(0, name, record.title, record.severity, "resolved", reason, now, False)
            try:
                self.store.save(updated, event)
            except Exception:
                log.exception("Alert %s: its resolution (rule not evaluated any more) could not be saved in %s;"
                              " tried again at the next check", name, self.store.path)
                continue
            self.records[name] = updated
            metrics.MONITOR_ALERT_FIRING.remove(name, record.severity)
            if event is not None:
                log.info("Alert %s resolved: %s", name, event.message)

    def _apply(self, rule: AlertRule, result: RuleResult, now: float) -> int:
        """One check's effect on the rule's alert. The change is made on a copy, kept only once the store
        has committed it: a failed write leaves the alert as it was, so the next check retries it."""
        if result.firing is None:
            return 0
        current = self.records.get(rule.name)
        record = dataclasses.replace(current) if current is not None else AlertRecord(rule.name, rule.title,
                                                                                      rule.severity)
        record.title, record.severity, record.threshold = rule.title, rule.severity, rule.threshold
        if not result.firing:
            return self._clear(rule, current, record, result, now)
        record.message, record.value, record.updated_at = result.message, result.value, now
        event = None
        if record.state != "firing":
            record.pending_checks += 1
            if record.pending_checks < self.confirm_checks:
                record.state = "pending"
                self._commit(current, record)
                return 0
            record.state, record.started_at, record.resolved_at, record.notified = "firing", now, None, False
            event = HistoryEntry(0, rule.name, rule.title, rule.severity, "fired", result.message, now, False)
        cooling = record.last_notified_at is not None and now - record.last_notified_at < self.cooldown_s
        if record.notified or cooling:
            self._commit(current, record, event)
            if event is not None:
                log.warning("Alert %s fired (notification held back by the cooldown): %s", rule.name, result.message)
            return 0
        record.notified, record.last_notified_at = True, now
        notification = self._notification(rule, record, "fired", now)
        mark = record.fired_event_id if event is None else None  # a held-back incident now sent
        if event is not None:
            event = dataclasses.replace(event, notified=True)
        self._commit(current, record, event, [(n, notification) for n in self.notifier_names], mark)
        log.log(LOG_LEVEL[rule.severity], "Alert %s fired [%s]: %s", rule.name, rule.severity, result.message)
        return len(self.notifier_names)

    def _clear(self, rule: AlertRule, current: AlertRecord | None, record: AlertRecord, result: RuleResult,
               now: float) -> int:
        if record.state == "pending":
            record.state, record.pending_checks = "ok", 0
            self._commit(current, record)
            return 0
        if record.state != "firing":
            return 0
        record.state, record.pending_checks, record.resolved_at, record.updated_at = "ok", 0, now, now
        record.message, record.value = result.message, result.value
        event = HistoryEntry(0, rule.name, rule.title, rule.severity, "resolved", result.message, now, record.notified)
        # Only an incident people were told about gets a resolution.
        notifications = []
        if record.notified:
            text = self._notification(rule, record, "resolved", now)
            notifications = [(n, text) for n in self.notifier_names]
        self._commit(current, record, event, notifications)
        log.info("Alert %s resolved: %s", rule.name, result.message)
        return len(notifications)

    def _commit(self, current: AlertRecord | None, record: AlertRecord, event: HistoryEntry | None = None,
                notifications: Sequence[tuple[str, str]] = (), mark_notified: int | None = None) -> None:
        """Save `record` (with its history entry and notifications) and only then make it the rule's
        alert and show it in fashion_monitor_alert_firing; raises what the store raises."""
        self.store.save(record, event, notifications, mark_notified=mark_notified)
        self.records[record.rule] = record
        if current is not None and current.state == "firing" and current.severity != record.severity:
            metrics.MONITOR_ALERT_FIRING.remove(record.rule, current.severity)
        if record.state == "firing":
            metrics.MONITOR_ALERT_FIRING.labels(record.rule, record.severity).set(1)
        elif current is not None and current.state == "firing":
            metrics.MONITOR_ALERT_FIRING.labels(record.rule, record.severity).set(0)

    def _notification(self, rule: AlertRule, record: AlertRecord, kind: str, now: float) -> str:
        return Notification(rule.name, rule.title, rule.severity, kind, record.message, now,
                            record.started_at or now, rule.condition, self.host).to_json()

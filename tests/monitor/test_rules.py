"""The alert rules and the engine's state machine, on a real SQLite state file. Observations are
built from the same dataclasses the health checks produce; time is passed in, so cooldowns are
tested without sleeping."""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from fashion.v1 import batch_pb2
from fashion.v1 import inference_pb2 as inference_pb
from services.common.config import MonitorSettings
from services.monitor.alerting import AlertEngine
from services.monitor.health import DiskCheck, Health, ServiceCheck, SystemCheck
from services.monitor.notifiers import Notification
from services.monitor.rules import (
    AlertRule,
    ApiStatsWindow,
    Observation,
    RuleResult,
    Severity,
    build_rules,
    measure_drift,
)
from services.monitor.store import MonitorStore

T0 = 1_760_000_000.0
NOW = datetime.now().astimezone()


def inference(up: bool = True, model_loaded: bool = True, **stats: object) -> ServiceCheck:
    if not up:
        return ServiceCheck("inference", "h:1", Health.UNHEALTHY, "UNAVAILABLE", "Inference service at h:1 unreachable",
                            0.0, NOW, reachable=False)
    s = inference_pb.Stats(model_loaded=model_loaded, model_name="m", model_version="1", **stats)  # type: ignore[arg-type]
    serving = "SERVING" if model_loaded else "NOT_SERVING"
    return ServiceCheck("inference", "h:1", Health.HEALTHY if model_loaded else Health.UNHEALTHY, serving, serving,
                        1.0, NOW, True, inference_stats=s)


def batch(stats: batch_pb2.BatchStats | None = None, up: bool = True) -> ServiceCheck:
    if not up:
        return ServiceCheck("batch", "h:2", Health.UNHEALTHY, "UNAVAILABLE", "Batch service at h:2 unreachable",
                            0.0, NOW, reachable=False)
    return ServiceCheck("batch", "h:2", Health.HEALTHY, "SERVING", "SERVING", 1.0, NOW, True, batch_stats=stats)


def observe(at: float, inf: ServiceCheck | None = None, bat: ServiceCheck | None = None,
            disks: list[DiskCheck] | None = None, drift_stats: batch_pb2.BatchStats | None = None,
            since: float = T0) -> Observation:
    system = SystemCheck(NOW, inf or inference(), bat or batch(),
                         disks if disks is not None else [DiskCheck(Path("data"), 100, 50)], drift_stats, 10.0)
    return Observation(system, None, since, at)


def engine(tmp_path: Path, cooldown_s: float = 0, confirm: int = 1, **settings: object) -> AlertEngine:
    s = MonitorSettings(alert_confirm_checks=confirm, alert_cooldown_s=cooldown_s, **settings)  # type: ignore[arg-type]
    store = MonitorStore(tmp_path / "monitor.db")
    return AlertEngine(build_rules(s), store, ["email", "slack"], cooldown_s, confirm)


def queued(e: AlertEngine) -> list[tuple[str, Notification]]:
    """Everything in the outbox, oldest first (drained as a delivery would)."""
    out = []
    while heads := e.store.outbox_heads():
        for h in heads:
            out.append((h.notifier, Notification.from_json(h.notification)))
            e.store.outbox_done(h.id)
    return sorted(out, key=lambda item: item[1].at)


def test_api_down_fires_once_per_incident_and_resolves_once(tmp_path: Path) -> None:
    e = engine(tmp_path)
    e.evaluate(observe(T0))
    assert queued(e) == []
    for i in range(5):  # down for five checks: one incident, one notification per notifier
        e.evaluate(observe(T0 + 10 + i, inference(up=False)))
    sent = queued(e)
    assert [(n, x.kind, x.subject) for n, x in sent] == [
        ("email", "fired", "[CRITICAL] API Down"), ("slack", "fired", "[CRITICAL] API Down")]
    assert "unreachable" in sent[0][1].message
    assert [a.rule for a in e.active()] == ["api_down"]
    for i in range(3):
        e.evaluate(observe(T0 + 20 + i))
    sent = queued(e)
    assert [(n, x.kind, x.subject) for n, x in sent] == [
        ("email", "resolved", "[INFO] Resolved: API Down"), ("slack", "resolved", "[INFO] Resolved: API Down")]
    assert sent[0][1].started_at == T0 + 10 and sent[0][1].at == T0 + 20
    assert e.active() == []
    kinds = [(h.kind, h.notified) for h in e.store.history(10, "api_down")]
    assert kinds == [("resolved", True), ("fired", True)]


def test_confirm_checks_filter_a_single_blip(tmp_path: Path) -> None:
    e = engine(tmp_path, confirm=2)
    e.evaluate(observe(T0, inference(up=False)))
    e.evaluate(observe(T0 + 1))
    e.evaluate(observe(T0 + 2, inference(up=False)))
    assert queued(e) == [] and e.active() == []
    e.evaluate(observe(T0 + 3, inference(up=False)))
    assert [x.kind for _, x in queued(e)] == ["fired", "fired"]


def test_cooldown_holds_a_flapping_alert_back_and_sends_it_when_it_ends(tmp_path: Path) -> None:
    e = engine(tmp_path, cooldown_s=600)
    e.evaluate(observe(T0, inference(up=False)))
    e.evaluate(observe(T0 + 30))
    assert [x.kind for n, x in queued(e) if n == "email"] == ["fired", "resolved"]
    e.evaluate(observe(T0 + 60, inference(up=False)))  # again within 10 minutes: recorded, not sent
    e.evaluate(observe(T0 + 90))
    assert queued(e) == []
    assert [(h.kind, h.notified) for h in e.store.history(2)] == [("resolved", False), ("fired", False)]
    e.evaluate(observe(T0 + 120, inference(up=False)))
    assert queued(e) == [] and e.active()[0].notified is False
    e.evaluate(observe(T0 + 601, inference(up=False)))  # still down when the cooldown ends: sent now
    assert [x.kind for n, x in queued(e) if n == "email"] == ["fired"]
    assert e.store.history(1)[0].notified is True
    e.evaluate(observe(T0 + 700))
    assert [x.kind for n, x in queued(e) if n == "email"] == ["resolved"]


def test_state_survives_a_restart_without_a_second_notification(tmp_path: Path) -> None:
    e = engine(tmp_path)
    e.evaluate(observe(T0, inference(up=False)))
    assert len(queued(e)) == 2
    e.store.close()
    again = engine(tmp_path)
    assert [a.rule for a in again.active()] == ["api_down"]
    again.evaluate(observe(T0 + 5, inference(up=False)))
    assert queued(again) == []
    again.evaluate(observe(T0 + 10))
    sent = queued(again)
    assert [x.kind for _, x in sent] == ["resolved", "resolved"] and sent[0][1].started_at == T0


def test_missing_data_neither_fires_nor_resolves(tmp_path: Path) -> None:
    e = engine(tmp_path, batch_max_age_hours=26)
    old_run = batch_pb2.BatchStats(days=7, last_run_age_hours=30.0)
    old_run.last_run_at.FromSeconds(int(T0 - 30 * 3600))
    e.evaluate(observe(T0, bat=batch(old_run)))
    assert [a.rule for a in e.active()] == ["no_recent_batch_run"]
    assert "30.0 hours ago" in e.active()[0].message
    queued(e)
    e.evaluate(observe(T0 + 5, bat=batch(up=False)))  # Batch service down: cannot tell, stays firing
    assert "no_recent_batch_run" in [a.rule for a in e.active()]
    assert [x.title for _, x in queued(e)] == ["Batch Service Down", "Batch Service Down"]


def test_no_run_yet_counts_from_when_monitoring_started(tmp_path: Path) -> None:
    e = engine(tmp_path)
    never = batch_pb2.BatchStats(days=7)
    e.evaluate(observe(T0 + 3600, bat=batch(never), since=T0))
    assert e.active() == []
    e.evaluate(observe(T0 + 27 * 3600, bat=batch(never), since=T0))
    assert [a.rule for a in e.active()] == ["no_recent_batch_run"]
    assert "No batch run has finished yet" in e.active()[0].message


def test_disk_model_and_error_rate_rules(tmp_path: Path) -> None:
    e = engine(tmp_path, alert_min_images=10)
    week = batch_pb2.BatchStats(days=7, images=200, successful=180, failed=20, success_rate=90.0)
    week.last_run_at.FromSeconds(int(T0))
    failed = inference(model_loaded=False, model_error="ModelLoadError: manifest.json is not valid JSON")
    e.evaluate(observe(T0, failed, batch(week), disks=[DiskCheck(Path("data"), 1000, 50)]))
    active = {a.rule: a for a in e.active()}
    assert set(active) == {"model_load_failure", "high_error_rate", "disk_space_low"}, active
    assert "model_loaded = false" in active["model_load_failure"].message
    assert "manifest.json is not valid JSON" in active["model_load_failure"].message
    assert "batch success rate 90.0%" in active["high_error_rate"].message
    assert "5.0% free" in active["disk_space_low"].message and active["disk_space_low"].value == 5.0


def test_a_model_still_loading_is_not_a_failure_until_the_grace_period_ends(tmp_path: Path) -> None:
    e = engine(tmp_path, alert_model_load_grace_s=300)
    e.evaluate(observe(T0, inference(model_loaded=False, uptime_seconds=20), batch()))
    assert "model_load_failure" not in {a.rule for a in e.active()}, "a normal start is not an incident"
    e.evaluate(observe(T0 + 400, inference(model_loaded=False, uptime_seconds=420), batch()))
    active = {a.rule: a for a in e.active()}
    assert "still loading after 420 s" in active["model_load_failure"].message
    e.evaluate(observe(T0 + 500, inference(uptime_seconds=520), batch()))
    assert "model_load_failure" not in {a.rule for a in e.active()}


def test_disk_rule_covers_the_batch_services_data_root(tmp_path: Path) -> None:
    """The lowest disk decides, the one the Batch service measured included, named as such."""
    e = engine(tmp_path)
    remote = DiskCheck(Path("/srv/fashion/data"), 1000, 30, remote="Batch service")
    e.evaluate(observe(T0, inference(), batch(), disks=[DiskCheck(Path("data"), 1000, 500), remote]))
    active = {a.rule: a for a in e.active()}
    assert active["disk_space_low"].value == 3.0
    assert active["disk_space_low"].message.startswith("/srv/fashion/data (on the Batch service) is on a disk")


def test_api_window_judges_recent_traffic_and_detects_restarts() -> None:
    w = ApiStatsWindow(window_s=600)
    old = dict(uptime_seconds=10_000)
    assert w.add(T0, inference_pb.Stats(total_requests=100, total_images_processed=100, successful_predictions=100,
                                        average_latency_ms=10.0, **old)) is None
    win = w.add(T0 + 60, inference_pb.Stats(total_requests=150, total_images_processed=150,
                                            successful_predictions=120, average_latency_ms=(100 * 10 + 50 * 70) / 150,
                                            **old))
    assert win is not None and win.images == 50 and win.successful == 20
    assert win.success_rate == pytest.approx(40.0) and win.latency_s == pytest.approx(0.070)
    # A restarted service: its counters start over and all its traffic is recent.
    win = w.add(T0 + 120, inference_pb.Stats(total_requests=4, total_images_processed=4, successful_predictions=4,
                                             average_latency_ms=6000.0, uptime_seconds=30))
    assert win is not None and win.requests == 4 and win.latency_s == pytest.approx(6.0)


def test_high_response_time_from_the_window(tmp_path: Path) -> None:
    e = engine(tmp_path, alert_min_images=3, alert_response_time_max_s=5)
    system = observe(T0, inference()).system
    slow = ApiStatsWindow(600).add(T0, inference_pb.Stats(total_requests=4, total_images_processed=4,
                                                          successful_predictions=4, average_latency_ms=6000,
                                                          uptime_seconds=60))
    e.evaluate(Observation(system, slow, T0, T0))
    assert [a.rule for a in e.active()] == ["high_response_time"]
    assert "6.00 s" in e.active()[0].message


def daily(day: date, counts: dict[str, int], confidence: float, failed: int = 0) -> batch_pb2.DailyBatchStats:
    n = sum(counts.values()) + failed
    return batch_pb2.DailyBatchStats(
        date=day.isoformat(), runs=1, images=n, successful=n - failed, failed=failed, mean_confidence=confidence,
        categories=[batch_pb2.CategoryCount(category=k, count=v) for k, v in counts.items()])


def drift_window(last: dict[str, int], last_conf: float = 0.9) -> batch_pb2.BatchStats:
    start = date(2025, 10, 1)
    days = [daily(start + timedelta(days=i), {"Sneaker": 50, "Bag": 50}, 0.9) for i in range(7)]
    days.append(daily(start + timedelta(days=7), last, last_conf))
    return batch_pb2.BatchStats(days=8, daily=days)


def test_measure_drift_is_the_total_variation_distance() -> None:
    m = measure_drift(drift_window({"Sneaker": 100}), min_images=20)
    assert m is not None and m.day == "2025-10-08"
    assert m.distance == pytest.approx(0.5)
    assert m.shifts[0][1:] in ((1.0, 0.5), (0.0, 0.5))
    same = measure_drift(drift_window({"Sneaker": 50, "Bag": 50}), min_images=20)
    assert same is not None and same.distance == pytest.approx(0.0)
    assert measure_drift(drift_window({"Sneaker": 5}), min_images=20) is None  # too few images to judge


def test_drift_fires_on_category_shift_or_confidence_drop(tmp_path: Path) -> None:
    e = engine(tmp_path)
    e.evaluate(observe(T0, drift_stats=drift_window({"Sneaker": 50, "Bag": 50})))
    assert e.active() == []
    e.evaluate(observe(T0 + 1, drift_stats=drift_window({"Sneaker": 90, "Bag": 10})))
    assert [a.rule for a in e.active()] == ["drift"]
    assert "category distance 0.40" in e.active()[0].message and "Sneaker 90% (was 50%)" in e.active()[0].message
    e.evaluate(observe(T0 + 2, drift_stats=drift_window({"Sneaker": 50, "Bag": 50})))
    assert e.active() == []
    e.evaluate(observe(T0 + 3, drift_stats=drift_window({"Sneaker": 50, "Bag": 50}, last_conf=0.6)))
    assert [a.rule for a in e.active()] == ["drift"] and "mean confidence 0.60 (was 0.90" in e.active()[0].message


def test_a_failing_rule_is_logged_and_the_others_still_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(obs: Observation) -> RuleResult:
        raise RuntimeError("boom")

    rules = [AlertRule("broken", "Broken", Severity.INFO, "never", broken), *build_rules(MonitorSettings())]
    e = AlertEngine(rules, MonitorStore(tmp_path / "m.db"), ["email"], 0, 1)
    with caplog.at_level(logging.ERROR):
        e.evaluate(observe(T0, inference(up=False)))
    assert "Alert rule broken failed" in caplog.text
    assert [a.rule for a in e.active()] == ["api_down"]


def test_settings_name_the_unknown_rule_and_apply_overrides() -> None:
    with pytest.raises(ValueError, match="'no_such_rule'"):
        build_rules(MonitorSettings(alert_disabled_rules=["no_such_rule"]))
    rules = {r.name: r for r in build_rules(MonitorSettings(alert_severity={"disk_space_low": "CRITICAL"},
                                                            alert_disabled_rules=["drift"],
                                                            alert_success_rate_min=90))}
    assert rules["disk_space_low"].severity == Severity.CRITICAL and not rules["drift"].enabled
    assert "under 90%" in rules["high_error_rate"].condition


def test_history_and_record_json_roundtrip(tmp_path: Path) -> None:
    e = engine(tmp_path)
    e.evaluate(observe(T0, inference(up=False)))
    stored = e.store.records()["api_down"]
    assert stored.state == "firing" and stored.started_at == T0 and stored.notified
    assert json.loads(stored.to_json())["rule"] == "api_down"

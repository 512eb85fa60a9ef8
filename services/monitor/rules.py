"""Alert rules on the monitoring guide's triggers (docs/monitoring-and-logging-guide.md), plus
batch service down and drift, with the configured thresholds; alerting.py's engine evaluates them.

A rule answers firing, not firing, or "cannot tell" (its data is missing, e.g. the Batch service is
down): the last answer leaves the alert as it was, so an outage of one service never resolves or
fires the alerts that depend on its data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from fashion.v1 import batch_pb2
from fashion.v1 import inference_pb2 as inference_pb
from services.batch.health import run_is_recent
from services.common.config import MonitorSettings
from services.monitor.health import SystemCheck, human_size


class Severity(StrEnum):
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True)
class ApiWindow:
    """The Inference service's traffic over the recent window (differences of its counters)."""

    seconds: float
    requests: int
    images: int
    successful: int
    latency_s: float
    """Mean latency per request in the window."""

    @property
    def success_rate(self) -> float:
        return 100.0 * self.successful / self.images if self.images else 100.0


class ApiStatsWindow:
    """Snapshots of GetStats over the last `window_s`, to judge recent traffic rather than the
    since-start averages (one bad hour last week should not keep an alert firing today).

    Behind a load balancer (a headless Service with round_robin) each check may reach another
    Inference server, each with its own lifetime counters: snapshots are kept per server
    (Stats.instance_id), differences are taken between snapshots of one server only, and the
    window is the sum over the servers seen in it. A server not seen for longer than the window is
    forgotten; servers without an instance_id (older ones) count as one, as before."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._instances: dict[str, deque[tuple[float, inference_pb.Stats]]] = {}

    def add(self, at: float, stats: inference_pb.Stats) -> ApiWindow | None:
        snapshots = self._instances.setdefault(stats.instance_id, deque())
        if snapshots and _counters_went_back(snapshots[-1][1], stats):
            snapshots.clear()  # the service restarted
        snapshots.append((at, stats))
        for instance, kept in list(self._instances.items()):
            while kept and kept[0][0] < at - self.window_s:
                kept.popleft()
            if not kept:
                del self._instances[instance]
        parts = [part for kept in self._instances.values() if (part := self._traffic(kept)) is not None]
        if not parts:
            return None
        requests = sum(p.requests for p in parts)
        latency_total = sum(p.latency_s * p.requests for p in parts)
        return ApiWindow(max(p.seconds for p in parts), requests, sum(p.images for p in parts),
                         sum(p.successful for p in parts), latency_total / requests if requests > 0 else 0.0)

    def _traffic(self, snapshots: deque[tuple[float, inference_pb.Stats]]) -> ApiWindow | None:
        """One server's traffic in the window, from its own snapshots; None when it cannot tell yet."""
        at, stats = snapshots[-1]
        if stats.uptime_seconds <= self.window_s:
            base, span = inference_pb.Stats(), float(stats.uptime_seconds)  # all its traffic is recent
        elif len(snapshots) > 1:
            base_at, base = snapshots[0]
            span = at - base_at
        else:
            return None
        requests = stats.total_requests - base.total_requests
        latency_total = (stats.average_latency_ms * stats.total_requests
                         - base.average_latency_ms * base.total_requests) / 1000
        return ApiWindow(span, requests, stats.total_images_processed - base.total_images_processed,
                         stats.successful_predictions - base.successful_predictions,
                         latency_total / requests if requests > 0 else 0.0)


def _counters_went_back(old: inference_pb.Stats, new: inference_pb.Stats) -> bool:
    return new.total_requests < old.total_requests or new.uptime_seconds < old.uptime_seconds


@dataclass(frozen=True)
class Observation:
    """Everything the rules judge, gathered once per check."""

    system: SystemCheck
    api_window: ApiWindow | None
    monitoring_since: float
    """When this monitor first started (wall clock): "no run yet" counts from here."""
    at: float


@dataclass(frozen=True)
class RuleResult:
    """What one check of a rule found: whether its condition holds, and what it measured."""

    firing: bool | None
    """None: cannot tell now; the alert stays as it is."""
    message: str
    value: float = 0.0


@dataclass(frozen=True)
class AlertRule:
    name: str
    title: str
    severity: Severity
    condition: str
    """What fires it, with the configured threshold (shown in notifications and ListAlerts)."""
    check: Callable[[Observation], RuleResult]
    threshold: float = 0.0
    enabled: bool = True


# --- the rules ---------------------------------------------------------------------------------

def api_down(obs: Observation) -> RuleResult:
    """The API is down when the Inference service is, or when the REST gateway (the HTTP API of the
    guide's users) does not answer its /health; a gateway answering 503 is judged by the Inference part."""
    gateway = obs.system.gateway
    if gateway is not None and not gateway.reachable:
        return RuleResult(True, gateway.message)
    inf = obs.system.inference
    if not inf.reachable:
        return RuleResult(True, inf.message)
    stats = inf.inference_stats
    if inf.serving_status != "SERVING" and (stats is None or stats.model_loaded):
        return RuleResult(True, f"Inference service at {inf.address} answers {inf.serving_status}")
    return RuleResult(False, f"Inference service at {inf.address} answers {inf.serving_status}")


def model_load_failure(grace_s: float) -> Callable[[Observation], RuleResult]:
    def check(obs: Observation) -> RuleResult:
        inf = obs.system.inference
        if not inf.reachable or inf.inference_stats is None:
            return RuleResult(None, "Inference service statistics unavailable")
        stats = inf.inference_stats
        if not stats.model_loaded:
            where = f"Inference service at {inf.address} reports model_loaded = false (health: {inf.serving_status})"
            if stats.model_error:
                return RuleResult(True, f"{where}: {stats.model_error}; see its logs/api_errors.log")
            if stats.uptime_seconds < grace_s:  # starting up: neither an incident nor its end
                return RuleResult(None, f"{where}: loading for {stats.uptime_seconds} s")
            return RuleResult(True, f"{where}: still loading after {stats.uptime_seconds} s; see its logs/api.log")
        return RuleResult(False, f"Model {stats.model_name} v{stats.model_version} loaded")
    return check


def batch_service_down(obs: Observation) -> RuleResult:
    batch = obs.system.batch
    if not batch.reachable or batch.serving_status != "SERVING":
        return RuleResult(True, batch.message if not batch.reachable
                       else f"Batch service at {batch.address} answers {batch.serving_status}")
    return RuleResult(False, f"Batch service at {batch.address} answers SERVING")


def high_error_rate(minimum: float, min_images: int) -> Callable[[Observation], RuleResult]:
    def check(obs: Observation) -> RuleResult:
        judged: list[tuple[str, float]] = []
        window = obs.api_window
        if window is not None and window.images >= min_images:
            judged.append((f"API success rate {window.success_rate:.1f}% over the last {_span(window.seconds)}"
                           f" ({window.images:,} images)", window.success_rate))
        stats = obs.system.batch.batch_stats
        if stats is not None and stats.images >= min_images:
            judged.append((f"batch success rate {stats.success_rate:.1f}% over the last {stats.days} days"
                           f" ({stats.images:,} images)", stats.success_rate))
        if not judged:
            return RuleResult(None, "not enough traffic to judge")
        low = [text for text, rate in judged if rate < minimum]
        value = min(rate for _, rate in judged)
        if low:
            return RuleResult(True, "; ".join(low) + f" (threshold {minimum:g}%)", value)
        return RuleResult(False, "; ".join(text for text, _ in judged), value)
    return check


def no_recent_batch_run(max_age_h: float) -> Callable[[Observation], RuleResult]:
    def check(obs: Observation) -> RuleResult:
        stats = obs.system.batch.batch_stats
        if stats is None:
            return RuleResult(None, "batch statistics unavailable")
        if not stats.HasField("last_run_at"):
            watched_h = (obs.at - obs.monitoring_since) / 3600
            return RuleResult(watched_h > max_age_h,
                           f"No batch run has finished yet (monitored for {watched_h:.1f} hours)", watched_h)
        age = stats.last_run_age_hours
        return RuleResult(not run_is_recent(stats, max_age_h, obs.at),
                          f"Last batch run was {age:.1f} hours ago (threshold {max_age_h:g} h)", age)
    return check


def disk_space_low(min_free_percent: float) -> Callable[[Observation], RuleResult]:
    def check(obs: Observation) -> RuleResult:
        if not obs.system.disks:
            return RuleResult(None, "no disk could be read")
        lowest = min(obs.system.disks, key=lambda d: d.free_percent)
        text = (f"{lowest.label} is on a disk with {lowest.free_percent:.1f}% free ({human_size(lowest.free_bytes)}"
                f" of {human_size(lowest.total_bytes)}; threshold {min_free_percent:g}%)")
        return RuleResult(lowest.free_percent < min_free_percent, text, lowest.free_percent)
    return check


def high_response_time(max_s: float, min_requests: int) -> Callable[[Observation], RuleResult]:
    def check(obs: Observation) -> RuleResult:
        window = obs.api_window
        if window is None or window.requests < min_requests:
            return RuleResult(None, "not enough requests to judge")
        text = (f"API average response time {window.latency_s:.2f} s over the last {_span(window.seconds)}"
                f" ({window.requests:,} requests; threshold {max_s:g} s)")
        return RuleResult(window.latency_s > max_s, text, window.latency_s)
    return check


@dataclass(frozen=True)
class DriftMeasure:
    day: str
    distance: float
    """Total variation distance between the day's category shares and the baseline's (0..1)."""
    confidence: float
    baseline_confidence: float
    shifts: list[tuple[str, float, float]]
    """(category, day share, baseline share), largest change first."""


def measure_drift(stats: batch_pb2.BatchStats, min_images: int, baseline_days: int = 7) -> DriftMeasure | None:
    """Compare the last day with images to the `baseline_days` before it; None when either side has
    fewer than `min_images` images."""
    days = [d for d in stats.daily if d.images > 0]
    if len(days) < 2:
        return None
    last = days[-1]
    index = list(stats.daily).index(last)
    baseline = [d for d in list(stats.daily)[max(0, index - baseline_days):index] if d.images > 0]
    if last.images < min_images or sum(d.images for d in baseline) < min_images:
        return None
    day_counts = {c.category: c.count for c in last.categories}
    base_counts: dict[str, int] = {}
    for d in baseline:
        for c in d.categories:
            base_counts[c.category] = base_counts.get(c.category, 0) + c.count
    day_total, base_total = sum(day_counts.values()), sum(base_counts.values())
    if not day_total or not base_total:
        return None
    shares = {k: (day_counts.get(k, 0) / day_total, base_counts.get(k, 0) / base_total)
              for k in day_counts.keys() | base_counts.keys()}
    distance = 0.5 * sum(abs(p - q) for p, q in shares.values())
    shifts = sorted(((k, p, q) for k, (p, q) in shares.items()), key=lambda s: -abs(s[1] - s[2]))
    weights = [max(d.images - d.failed, 0) for d in baseline]
    base_conf = (sum(w * d.mean_confidence for w, d in zip(weights, baseline, strict=True)) / sum(weights)
                 if sum(weights) else last.mean_confidence)
    return DriftMeasure(last.date, distance, last.mean_confidence, base_conf, shifts)


def drift(max_distance: float, max_confidence_drop: float, min_images: int) -> Callable[[Observation], RuleResult]:
    def check(obs: Observation) -> RuleResult:
        stats = obs.system.drift_stats
        if stats is None:
            return RuleResult(None, "batch statistics unavailable")
        measured = measure_drift(stats, min_images)
        if measured is None:
            return RuleResult(None, "not enough images to compare")
        shifts = ", ".join(f"{k} {p:.0%} (was {q:.0%})" for k, p, q in measured.shifts[:3])
        drop = measured.baseline_confidence - measured.confidence
        text = (f"{measured.day} against the previous 7 days: category distance {measured.distance:.2f} "
                f"(threshold {max_distance:g}); largest shifts: {shifts}; mean confidence "
                f"{measured.confidence:.2f} (was {measured.baseline_confidence:.2f}, "
                f"threshold drop {max_confidence_drop:g})")
        return RuleResult(measured.distance > max_distance or drop > max_confidence_drop, text, measured.distance)
    return check


def build_rules(settings: MonitorSettings) -> list[AlertRule]:
    """The rules with the configured thresholds, severities and enabled flags. ValueError names an
    unknown rule in FASHION_ALERT_DISABLED_RULES or FASHION_ALERT_SEVERITY."""
    s = settings
    rules = [
        AlertRule("api_down", "API Down", Severity.CRITICAL,
                  "the Inference service's grpc.health.v1 check or the gateway's /health fails", api_down),
        AlertRule("high_error_rate", "High Error Rate", Severity.WARNING,
                  f"API or batch success rate under {s.alert_success_rate_min:g}%",
                  high_error_rate(s.alert_success_rate_min, s.alert_min_images), s.alert_success_rate_min),
        AlertRule("no_recent_batch_run", "No Recent Batch Run", Severity.WARNING,
                  f"last batch run more than {s.batch_max_age_hours:g} hours ago",
                  no_recent_batch_run(s.batch_max_age_hours), s.batch_max_age_hours),
        AlertRule("disk_space_low", "Disk Space Low", Severity.WARNING,
                  f"a monitored disk has under {s.alert_disk_free_min_percent:g}% free",
                  disk_space_low(s.alert_disk_free_min_percent), s.alert_disk_free_min_percent),
        AlertRule("high_response_time", "High Response Time", Severity.WARNING,
                  f"API average response time over {s.alert_response_time_max_s:g} s",
                  high_response_time(s.alert_response_time_max_s, s.alert_min_images), s.alert_response_time_max_s),
        AlertRule("model_load_failure", "Model Load Failure", Severity.ERROR,
                  f"the Inference service reports model_loaded = false: a failed load, or still loading after "
                  f"{s.alert_model_load_grace_s:g} s", model_load_failure(s.alert_model_load_grace_s),
                  s.alert_model_load_grace_s),
        AlertRule("batch_service_down", "Batch Service Down", Severity.ERROR,
                  "the Batch service's grpc.health.v1 check fails", batch_service_down),
        AlertRule("drift", "Prediction Drift", Severity.WARNING,
                  f"last day's category distance over {s.alert_drift_tvd_max:g} or mean confidence "
                  f"drop over {s.alert_drift_confidence_drop_max:g} against the previous 7 days",
                  drift(s.alert_drift_tvd_max, s.alert_drift_confidence_drop_max, s.alert_min_images),
                  s.alert_drift_tvd_max),
    ]
    names = {r.name for r in rules}
    unknown = (set(s.alert_disabled_rules) | set(s.alert_severity)) - names
    if unknown:
        raise ValueError(f"unknown alert rule(s) {sorted(unknown)} in FASHION_ALERT_DISABLED_RULES or "
                         f"FASHION_ALERT_SEVERITY; rules are {sorted(names)}")
    return [AlertRule(r.name, r.title, Severity(s.alert_severity.get(r.name, r.severity)), r.condition, r.check,
                      r.threshold, r.name not in s.alert_disabled_rules) for r in rules]


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"

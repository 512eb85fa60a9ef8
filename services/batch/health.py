"""Batch processing health: the monitoring guide's check_batch_health.py (recent execution, recent
errors, the window's statistics), judged here once for every caller: `fashion batch health` (through
GetBatchHealth, or from the jobs database with --local), the Monitor and its alert rules."""

from __future__ import annotations

import time

from fashion.v1 import batch_pb2 as pb
from fashion.v1 import health_pb2
from services.common.config import CommonSettings

FAILED_JOB_WINDOW_H = 24.0
_ORDER = [health_pb2.HEALTH_STATUS_HEALTHY, health_pb2.HEALTH_STATUS_DEGRADED, health_pb2.HEALTH_STATUS_UNHEALTHY]


def run_is_recent(stats: pb.BatchStats, max_age_hours: float, now: float | None = None) -> bool:
    """Whether the last run finished within `max_age_hours` of `now` (the guide's "Last run > 26 hours ago"
    is not); measured from last_run_at, not from the rounded last_run_age_hours."""
    if not stats.HasField("last_run_at"):
        return False
    now = time.time() if now is None else now
    return now - stats.last_run_at.ToNanoseconds() / 1e9 <= max_age_hours * 3600


def _worst(*statuses: int) -> int:
    return max(statuses, key=_ORDER.index)


def judge(stats: pb.BatchStats, last_failed: pb.Job | None, settings: CommonSettings,
          max_age_hours: float | None = None, now: float | None = None) -> pb.BatchHealth:
    """UNHEALTHY when no run finished within the threshold (FASHION_BATCH_MAX_AGE_HOURS unless given) or a
    job failed in the last 24 hours; else DEGRADED when errors were recorded recently or the success rate
    is under FASHION_ALERT_SUCCESS_RATE_MIN (once FASHION_ALERT_MIN_IMAGES images were processed); else
    HEALTHY."""
    now = time.time() if now is None else now
    max_age = settings.batch_max_age_hours if max_age_hours is None else max_age_hours
    recent = run_is_recent(stats, max_age, now)
    if not stats.HasField("last_run_at"):
        status, message = health_pb2.HEALTH_STATUS_UNHEALTHY, "No batch run has finished yet"
    else:
        status = health_pb2.HEALTH_STATUS_HEALTHY if recent else health_pb2.HEALTH_STATUS_UNHEALTHY
        message = f"Last run was {stats.last_run_age_hours:.1f} hours ago" + (
            "" if recent else f" (more than {max_age:g} hours)")
    failed = (last_failed if last_failed is not None and last_failed.HasField("finished_at")
              and now - last_failed.finished_at.seconds < FAILED_JOB_WINDOW_H * 3600 else None)
    if failed is not None:
        status = health_pb2.HEALTH_STATUS_UNHEALTHY
    if stats.recent_errors:
        status = _worst(status, health_pb2.HEALTH_STATUS_DEGRADED)
    if stats.images >= settings.alert_min_images and stats.success_rate < settings.alert_success_rate_min:
        status = _worst(status, health_pb2.HEALTH_STATUS_DEGRADED)
    result = pb.BatchHealth(status=status, message=message, recent_run=recent, max_age_hours=max_age,
                            recent_errors=stats.recent_errors, stats=stats,
                            success_rate_min=settings.alert_success_rate_min, failed_job=failed)
    result.checked_at.FromSeconds(int(now))
    return result

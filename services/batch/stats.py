"""Run history from the jobs database: what GetBatchStats, `fashion batch health` and the
Monitor service's dashboards and alerts read.

A run is a job that ended (succeeded, failed or cancelled) inside the window; the window is
the last `days` local calendar days, today included, so the daily rows add up to the totals.
The last run (its time and age, what batch health and the no_recent_batch_run alert judge) is the
last job that succeeded or failed (JobStore.last_finished): a cancelled job is no run, or cancelling
a job would hide a batch that has not run. A failed one counts: its failure is reported on its own.
Recent errors are those of the last 24 hours: images that could not be classified or moved,
and failed jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from fashion.client.text import printable
from services.batch import reports
from services.batch.records import JobRecord, JobState
from services.batch.store import JobStore

ERROR_WINDOW_S = 24 * 3600
MAX_ERRORS = 50


def success_rate(images: int, failed: int) -> float:
    """The batch success rate in percent, two decimals: the images classified (successful or uncertain:
    an uncertain image was classified, only below the confidence threshold) of those processed;
    100 when none was processed. successful + uncertain + failed = images."""
    return round(100.0 * (images - failed) / images, 2) if images else 100.0


@dataclass
class DayHistory:
    date: str
    runs: int = 0
    images: int = 0
    successful: int = 0
    failed: int = 0
    uncertain: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0

    @property
    def success_rate(self) -> float:
        return success_rate(self.images, self.failed)

    @property
    def mean_confidence(self) -> float:
        classified = self.successful + self.uncertain
        return self.confidence_sum / classified if classified else 0.0


@dataclass
class BatchHistory:
    days: int
    last_run_at: float | None
    last_run_age_hours: float
    runs: int
    images: int
    successful: int
    failed: int
    uncertain: int
    success_rate: float
    top_categories: list[tuple[str, int]]
    daily: list[DayHistory]
    recent_errors: list[str]
    active_jobs: int
    data_root: str = ""
    data_total_bytes: int = 0
    """The data root's file system (0: unknown)."""
    data_free_bytes: int = 0


def batch_history(store: JobStore, days: int = 7, now: float | None = None) -> BatchHistory:
    now = now or time.time()
    days = max(1, days)
    today = datetime.fromtimestamp(now).date()
    first = today - timedelta(days=days - 1)
    since = datetime.combine(first, datetime.min.time()).timestamp()
    daily = {first + timedelta(days=i): DayHistory((first + timedelta(days=i)).isoformat()) for i in range(days)}
    categories: dict[str, int] = {}
    for job in store.finished_since(since):
        assert job.finished_at is not None
        day = daily.get(date.fromtimestamp(job.finished_at))
        if day is None:  # finished after `now` (clock change): count it today
            day = daily[today]
        _add(day, job)
        for name, n in job.counts.categories.items():
            categories[name] = categories.get(name, 0) + n
    totals = DayHistory("total")
    for day in daily.values():
        for name in ("runs", "images", "successful", "failed", "uncertain"):
            setattr(totals, name, getattr(totals, name) + getattr(day, name))
    last = store.last_finished()
    last_at = last.finished_at if last is not None else None
    return BatchHistory(
        days=days, last_run_at=last_at,
        last_run_age_hours=round((now - last_at) / 3600, 2) if last_at is not None else 0.0,
        runs=totals.runs, images=totals.images, successful=totals.successful, failed=totals.failed,
        uncertain=totals.uncertain,
        success_rate=totals.success_rate,
        top_categories=sorted(categories.items(), key=lambda kv: (-kv[1], kv[0])),
        daily=list(daily.values()),
        recent_errors=recent_errors(store, now),
        active_jobs=len(store.unfinished_ids()),
    )


def _add(day: DayHistory, job: JobRecord) -> None:
    c = job.counts
    day.runs += 1
    day.images += c.processed
    day.successful += c.successful
    day.failed += c.failed
    day.uncertain += c.uncertain
    day.confidence_sum += c.confidence_sum
    for name, n in c.categories.items():
        day.categories[name] = day.categories.get(name, 0) + n


def recent_errors(store: JobStore, now: float) -> list[str]:
    """Error lines of the last 24 hours, newest first: "<local time> job <id>: <file>: <why>"."""
    since = now - ERROR_WINDOW_S
    lines: list[tuple[float, str]] = []
    for job in store.finished_since(since):
        if job.state == JobState.FAILED and job.finished_at is not None:
            lines.append((job.finished_at, f"{_when(job.finished_at)} job {job.job_id} FAILED: {printable(job.error)}"))
    inputs: dict[str, str] = {}
    for f in store.failed_files_since(since, MAX_ERRORS):
        if f.job_id not in inputs:
            inputs[f.job_id] = store.get(f.job_id).input_dir
        # One line each, whatever the names hold: reports, emails and Slack messages quote these lines.
        name = printable(reports.display_name(f.source, inputs[f.job_id]))
        lines.append((f.finished_at or 0.0, f"{_when(f.finished_at or 0.0)} job {f.job_id}: {name}: "
                      f"{printable(f.error)}"))
    lines.sort(key=lambda item: item[0], reverse=True)
    return [line for _, line in lines[:MAX_ERRORS]]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")

"""The monitoring dashboard of the monitoring guide's monitoring/dashboard.py
(docs/monitoring-and-logging-guide.md): a text report in its format
(API HEALTH, BATCH PROCESSING HEALTH, BATCH STATISTICS (Last 7 Days) with Top Categories, DISK
USAGE, RECENT ERRORS; then ACTIVE ALERTS), four PNG charts (daily processing volume,
success/failure breakdown, category distribution, summary statistics) and one self-contained HTML
page embedding them, written to the report folder with timestamped names.

The charts are drawn by charts.py.
"""

from __future__ import annotations

import base64
import errno
import html
import itertools
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fashion.v1 import batch_pb2
from services.common.retention import prune_files
from services.monitor.charts import (
    STATUS_COLORS,
    category_chart,
    daily_volume_chart,
    success_failure_chart,
    summary_chart,
    write_png,
)
from services.monitor.health import BatchHealthResult, Health, SystemCheck, human_size, worst
from services.monitor.store import AlertRecord

log = logging.getLogger(__name__)

RULE = "=" * 70
MARK = {Health.HEALTHY: "✓", Health.DEGRADED: "⚠", Health.UNHEALTHY: "✗"}
TOP_CATEGORIES = 5
RECENT_ERRORS = 10

# matplotlib's font cache and text layout are not thread-safe; one report at a time also keeps names unique.
_render_lock = threading.Lock()


@dataclass(frozen=True)
class ReportData:
    """What the report shows; gathered by the monitor from the services' APIs."""

    generated_at: datetime
    system: SystemCheck
    batch_health: BatchHealthResult | None
    """None when the Batch service did not answer GetBatchStats."""
    history: batch_pb2.BatchStats | None
    """The chart window (FASHION_REPORT_CHART_DAYS)."""
    alerts: list[AlertRecord] | None = None
    """Firing alerts; None when the alert state is not available (embedded run without a state file)."""
    batch_error: str = ""


STALE_TEMPORARY_DAYS = 1 / 24
"""A report's temporary file this old (an hour: a report takes seconds) is a writer's killed mid-write."""


class ReportNotWritten(OSError):
    """The report folder did not take the report (full, read-only, not a folder); nothing of it is left
    there. `filename` is the folder; the text names it and its setting."""

    def __str__(self) -> str:
        return f"cannot write the report in {self.filename} (FASHION_REPORT_DIR): {self.strerror}"


class ReportDiskFull(ReportNotWritten):
    """The report folder's disk (or the quota) is full: the report can be written once there is room."""


@dataclass(frozen=True)
class ReportFiles:
    text_path: Path
    text: str
    generated_at: datetime
    html_path: Path | None = None
    chart_paths: list[Path] = field(default_factory=list)


# --- text report -------------------------------------------------------------------------------

def render_text(data: ReportData) -> str:
    lines = ["FASHION CLASSIFIER - MONITORING REPORT", RULE,
             f"Generated: {data.generated_at:%Y-%m-%d %H:%M:%S}", ""]
    inf, gateway = data.system.inference, data.system.gateway
    api = worst(inf.status, gateway.status) if gateway is not None else inf.status
    lines += ["API HEALTH:", f"  {MARK[api]} Status: {api}", f"     Message: {inf.message}",
              f"     Check latency: {inf.latency_ms:.1f} ms"]
    if gateway is not None:
        lines.append(f"     REST gateway ({gateway.address}): {gateway.status}: {gateway.message}")
    lines.append("")
    lines += ["BATCH PROCESSING HEALTH:"]
    bh = data.batch_health
    if bh is None:
        lines += [f"  {MARK[Health.UNHEALTHY]} Status: UNKNOWN", f"     Message: {data.batch_error}"]
    else:
        message = (f"Last run {bh.stats.last_run_age_hours:.1f} hours ago" if bh.stats.HasField("last_run_at")
                   else bh.message)
        lines += [f"  {MARK[bh.status]} Status: {bh.status}", f"     Message: {message}"]
    lines += ["", "BATCH STATISTICS (Last 7 Days):"]
    if bh is None:
        lines += ["  Not available: the Batch service did not answer"]
    else:
        s = bh.stats
        lines += [f"  Total Runs: {s.runs:,}", f"  Images Processed: {s.images:,}",
                  f"  Success Rate: {s.success_rate:.1f}%", f"  Failed: {s.failed:,}"]
        if s.uncertain:
            lines.append(f"  Uncertain: {s.uncertain:,}")
        lines += ["", "  Top Categories:"]
        top = list(s.top_categories)[:TOP_CATEGORIES]
        lines += [f"    - {c.category}: {c.count:,}" for c in top] or ["    (none yet)"]
    lines += ["", "DISK USAGE:"]
    lines += [f"  {d.path}: {human_size(d.folder_bytes)}" for d in data.system.disks if not d.remote]
    seen: set[tuple[int, int]] = set()
    for d in data.system.disks:
        if (d.total_bytes, d.free_bytes) not in seen:
            seen.add((d.total_bytes, d.free_bytes))
            lines.append(f"  Free space on the disk of {d.label}: {d.free_percent:.1f}% "
                         f"({human_size(d.free_bytes)} of {human_size(d.total_bytes)})")
    lines += ["", "RECENT ERRORS:"]
    if bh is None:
        lines.append(f"  {MARK[Health.DEGRADED]} Unknown: the Batch service did not answer")
    elif not bh.recent_errors:
        lines.append(f"  {MARK[Health.HEALTHY]} No recent errors detected")
    else:
        lines.append(f"  {MARK[Health.UNHEALTHY]} {len(bh.recent_errors)} recent errors (newest first):")
        lines += [f"    - {e}" for e in bh.recent_errors[:RECENT_ERRORS]]
    lines += ["", "ACTIVE ALERTS:"]
    if data.alerts is None:
        lines.append("  Not available: alert state is kept by the Monitor service")
    elif not data.alerts:
        lines.append(f"  {MARK[Health.HEALTHY]} No active alerts")
    else:
        for a in data.alerts:
            since = datetime.fromtimestamp(a.started_at or 0).strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"  {MARK[Health.UNHEALTHY]} [{a.severity}] {a.title} (since {since}): {a.message}")
    lines += ["", RULE]
    return "\n".join(lines) + "\n"


# --- files -------------------------------------------------------------------------------------

class Dashboard:
    """Writes one report (text, charts, HTML) per call into `report_dir`."""

    CHARTS = ("daily_volume", "success_failure", "category_distribution", "summary_statistics")

    def __init__(self, report_dir: Path, success_rate_min: float = 95.0, min_images: int = 20,
                 keep_days: float = 0.0) -> None:
        self.report_dir = report_dir
        self.success_rate_min = success_rate_min
        self.min_images = min_images
        self.keep_days = keep_days

    def write(self, data: ReportData, text_only: bool = False) -> ReportFiles:
        """Blocking (run it in a worker thread). Files appear complete or not at all; then the
        dashboard files older than keep_days are deleted."""
        with _render_lock:
            files = self._write(data, text_only)
        self.prune()
        return files

    def prune(self, now: float | None = None) -> int:
        """Delete this dashboard's files (by their names) older than keep_days, and the temporary files of a
        writer killed mid-write older than STALE_TEMPORARY_DAYS whatever keep_days is; how many."""
        names = ("report_*.txt", "dashboard_*.html", *(f"{chart}_*.png" for chart in self.CHARTS))
        return (prune_files(self.report_dir, names, self.keep_days, now)
                + prune_files(self.report_dir, (".report-*.tmp", "*.png.tmp"), STALE_TEMPORARY_DAYS, now))

    def _write(self, data: ReportData, text_only: bool) -> ReportFiles:
        """The report's files, or none of them: a failure part-way (a full disk) removes those already
        written, so no text report is left without its charts and page, and raises ReportNotWritten."""
        written: list[Path] = []
        try:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            text = render_text(data)
            stamp, text_path = self._claim(data.generated_at, text.encode())
            written.append(text_path)
            if text_only:
                return ReportFiles(text_path, text, data.generated_at)
            figures = [daily_volume_chart(data.history),
                       success_failure_chart(data.history, self.success_rate_min),
                       category_chart(data.history, self.min_images),
                       summary_chart(data.generated_at, data.system, data.batch_health, data.alerts)]
            pngs = []
            for name, fig in zip(self.CHARTS, figures, strict=True):
                path = self.report_dir / f"{name}_{stamp}.png"
                write_png(fig, path)
                written.append(path)
                pngs.append(path)
            html_path = self.report_dir / f"dashboard_{stamp}.html"
            _write_atomic(html_path, render_html(data, text, pngs).encode())
            return ReportFiles(text_path, text, data.generated_at, html_path, pngs)
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            kind = ReportDiskFull if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ReportNotWritten
            raise kind(exc.errno, exc.strerror or str(exc), str(self.report_dir)) from exc

    def _claim(self, at: datetime, text: bytes) -> tuple[str, Path]:
        """Write the text report as report_YYYYMMDD_HHMMSS.txt, as the monitoring guide names it (a suffix when
        one already exists that second), complete or not at all; the stamp names the charts and page too.
        The name is taken by link(), which never replaces a file: another writer in the same second (the
        service and `fashion monitor dashboard --embedded`) gets the next suffix instead of overwriting."""
        base = at.strftime("%Y%m%d_%H%M%S")
        staged = _staged(self.report_dir, text)
        try:
            for n in itertools.count(1):
                stamp = base if n == 1 else f"{base}_{n}"
                path = self.report_dir / f"report_{stamp}.txt"
                try:
                    os.link(staged, path)
                except FileExistsError:
                    continue
                return stamp, path
        finally:
            staged.unlink()
        raise AssertionError("unreachable")


def render_html(data: ReportData, text: str, pngs: list[Path]) -> str:
    status = data.system.status
    if data.batch_health is not None:
        status = worst(status, data.batch_health.status)
    images = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in pngs)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fashion Classifier — Monitoring Report {data.generated_at:%Y-%m-%d %H:%M}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1250px;
       padding: 0 1rem; color: #263238; background: #fff; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }}
.status {{ display: inline-block; padding: .2rem .7rem; border-radius: 1rem; color: #fff; font-weight: 600;
          background: {STATUS_COLORS[status]}; }}
figure {{ margin: 1.5rem 0; }}
img {{ max-width: 100%; height: auto; border: 1px solid #e3e6ea; border-radius: 6px; }}
pre {{ background: #f5f7fa; padding: 1rem; border-radius: 6px; overflow-x: auto; font-size: .9rem; }}
</style>
</head>
<body>
<h1>Fashion Classifier — Monitoring Report</h1>
<p>Generated {data.generated_at:%Y-%m-%d %H:%M:%S} · overall status <span class="status">{status}</span></p>
{images}
<h2>Text report</h2>
<pre>{html.escape(text)}</pre>
</body>
</html>
"""


def _staged(folder: Path, content: bytes) -> Path:
    """`content` in a new file of `folder` with a name of its own (hidden, .tmp), for a rename or link; its
    mode is what the umask leaves of 0666, as for the charts beside it (mkstemp's 0600 would hide the
    report from the people who read it, a fixed 0644 would show it to everyone despite a umask of 077)."""
    while True:
        name = folder / f".report-{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as staged:
                staged.write(content)
        except BaseException:  # a full disk: no partial temporary file left to fill it further
            name.unlink(missing_ok=True)
            raise
        return name


def _write_atomic(path: Path, content: bytes) -> None:
    """`path` replaced by a complete file; two writers never share a temporary file."""
    staged = _staged(path.parent, content)
    try:
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise

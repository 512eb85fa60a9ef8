"""The dashboard's PNG charts: daily processing volume, success/failure breakdown, category
distribution (with drift against the previous week) and summary statistics.

matplotlib's object API on the Agg canvas: no pyplot global state, never a display. matplotlib's
font cache and text layout are not thread-safe: callers draw one report at a time (Dashboard does).
"""

from __future__ import annotations

import os
from datetime import date, datetime
from pathlib import Path

from matplotlib import dates as mdates
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from fashion.v1 import batch_pb2
from services.monitor.health import BatchHealthResult, Health, SystemCheck, worst
from services.monitor.rules import measure_drift
from services.monitor.store import AlertRecord

COLORS = {"primary": "#1f5fa8", "success": "#2e7d32", "uncertain": "#f2a900", "failed": "#c62828",
          "muted": "#8a8f98", "baseline": "#9bb7d9", "grid": "#e3e6ea"}
STATUS_COLORS = {Health.HEALTHY: "#2e7d32", Health.DEGRADED: "#e08e00", Health.UNHEALTHY: "#c62828"}
DPI = 110


def write_png(fig: Figure, path: Path) -> None:
    """`fig` as a PNG at `path`, complete or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
        os.replace(tmp, path)
    except BaseException:  # a full disk: no partial temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def _figure(width: float = 11.0, height: float = 5.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.set_facecolor("white")
    return fig


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:  # type: ignore[no-untyped-def]
    ax.set_title(title, fontsize=13, fontweight="bold", loc="left", pad=10)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.grid(axis="y", color=COLORS["grid"], linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _no_data(fig: Figure, title: str, why: str) -> Figure:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, fontsize=13, fontweight="bold", loc="left")
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=12, color=COLORS["muted"], transform=ax.transAxes)
    return fig


def _days(history: batch_pb2.BatchStats) -> list[date]:
    return [date.fromisoformat(d.date) for d in history.daily]


def _date_axis(ax, days: list[date]) -> None:  # type: ignore[no-untyped-def]
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=10))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))
    ax.set_xlim(mdates.date2num(days[0]) - 0.7, mdates.date2num(days[-1]) + 0.7)


def daily_volume_chart(history: batch_pb2.BatchStats | None) -> Figure:
    title = "Daily processing volume"
    fig = _figure()
    if history is None or not history.daily:
        return _no_data(fig, title, "No batch statistics: the Batch service did not answer")
    days = _days(history)
    images = [d.images for d in history.daily]
    runs = [d.runs for d in history.daily]
    ax = fig.add_subplot()
    ax.bar(days, images, width=0.8, color=COLORS["primary"], label="Images processed")
    avg = [sum(images[max(0, i - 6): i + 1]) / len(images[max(0, i - 6): i + 1]) for i in range(len(images))]
    ax.plot(days, avg, color="#ef6c00", linewidth=2, label="7-day average")
    _style(ax, f"{title} — last {len(days)} days ({sum(images):,} images in {sum(runs):,} runs)",
           "Date", "Images processed per day")
    _date_axis(ax, days)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    runs_ax = ax.twinx()
    runs_ax.plot(days, runs, linestyle="none", marker="o", markersize=5, color="#424242", label="Runs")
    runs_ax.set_ylabel("Runs per day", fontsize=10)
    runs_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    runs_ax.set_ylim(0, max(max(runs) * 1.25, 1))
    runs_ax.spines["top"].set_visible(False)
    handles = ax.get_legend_handles_labels()[0] + runs_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", frameon=False, ncols=3)
    ax.set_ylim(0, max(max(images) * 1.2, 1))
    return fig


def success_failure_chart(history: batch_pb2.BatchStats | None, success_rate_min: float) -> Figure:
    title = "Success / failure breakdown"
    fig = _figure()
    if history is None or not history.daily:
        return _no_data(fig, title, "No batch statistics: the Batch service did not answer")
    days = _days(history)
    ok = [d.successful for d in history.daily]
    unsure = [d.uncertain for d in history.daily]
    bad = [d.failed for d in history.daily]
    ax = fig.add_subplot()
    ax.bar(days, ok, width=0.8, color=COLORS["success"], label="Successful")
    ax.bar(days, unsure, width=0.8, bottom=ok, color=COLORS["uncertain"], label="Uncertain")
    ax.bar(days, bad, width=0.8, bottom=[a + b for a, b in zip(ok, unsure, strict=True)], color=COLORS["failed"],
           label="Failed")
    _style(ax, f"{title} — last {len(days)} days (success rate {history.success_rate:.1f}%, {sum(bad):,} failed)",
           "Date", "Images per day")
    _date_axis(ax, days)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(max(d.images for d in history.daily) * 1.2, 1))
    rate_ax = ax.twinx()
    rated = [(day, d.success_rate) for day, d in zip(days, history.daily, strict=True) if d.images]
    if rated:
        rate_ax.plot([r[0] for r in rated], [r[1] for r in rated], color="#212121", marker="o", markersize=3,
                     linewidth=1.5, label="Success rate")
    rate_ax.axhline(success_rate_min, color=COLORS["failed"], linestyle="--", linewidth=1,
                    label=f"Alert threshold {success_rate_min:g}%")
    low = min([r[1] for r in rated] + [success_rate_min])
    rate_ax.set_ylim(max(0, low - 5), 100.5)
    rate_ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    rate_ax.set_ylabel("Success rate", fontsize=10)
    rate_ax.spines["top"].set_visible(False)
    handles = ax.get_legend_handles_labels()[0] + rate_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", frameon=False, ncols=5, fontsize=9)
    return fig


def category_chart(history: batch_pb2.BatchStats | None, min_images: int) -> Figure:
    title = "Category distribution"
    fig = _figure(12.0, 5.6)
    totals: dict[str, int] = {}
    for d in history.daily if history is not None else []:
        for c in d.categories:
            totals[c.category] = totals.get(c.category, 0) + c.count
    if history is not None and not totals:
        totals = {c.category: c.count for c in history.top_categories}
    if not totals:
        why = ("No batch statistics: the Batch service did not answer" if history is None
               else "No classified images in the window yet")
        return _no_data(fig, title, why)
    order = sorted(totals, key=lambda k: (-totals[k], k))
    grand = sum(totals.values())
    left, right = fig.subplots(1, 2, width_ratios=[1.15, 1])
    y = list(range(len(order)))
    left.barh(y, [totals[k] for k in order], color=COLORS["primary"], height=0.7)
    left.set_yticks(y, order, fontsize=10)
    left.invert_yaxis()
    for i, k in enumerate(order):
        left.text(totals[k], i, f" {totals[k]:,} ({totals[k] / grand:.0%})", va="center", fontsize=9)
    left.set_xlim(0, max(totals.values()) * 1.3)
    _style(left, f"{title} — last {len(history.daily) if history else 0} days ({grand:,} images)",
           "Images", "Category")
    left.grid(axis="y", visible=False)
    left.grid(axis="x", color=COLORS["grid"], linewidth=0.8)

    drift = measure_drift(history, min_images) if history is not None else None
    if drift is None:
        right.set_axis_off()
        right.text(0.5, 0.5, "Drift check: not enough images yet\n(needs a day and the 7 days before it)",
                   ha="center", va="center", fontsize=10, color=COLORS["muted"], transform=right.transAxes)
        return fig
    shares = {k: (p, q) for k, p, q in drift.shifts}
    height = 0.38
    right.barh([i - height / 2 for i in y], [shares.get(k, (0, 0))[1] for k in order], height=height,
               color=COLORS["baseline"], label="Previous 7 days")
    right.barh([i + height / 2 for i in y], [shares.get(k, (0, 0))[0] for k in order], height=height,
               color="#ef6c00", label=drift.day)
    right.set_yticks(y, [""] * len(order))
    right.invert_yaxis()
    right.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    _style(right, f"Last day against the 7 before (distance {drift.distance:.2f})", "Share of the day's images", "")
    right.grid(axis="y", visible=False)
    right.grid(axis="x", color=COLORS["grid"], linewidth=0.8)
    right.legend(loc="lower right", frameon=False, fontsize=9)
    return fig


def summary_chart(generated_at: datetime, system: SystemCheck, batch_health: BatchHealthResult | None,
                  alerts: list[AlertRecord] | None) -> Figure:
    """Tiles: the services' status, active alerts and the week's batch and API figures (`alerts`
    None: the alert state is not available)."""
    fig = _figure(11.0, 4.6)
    fig.suptitle(f"Summary statistics — {generated_at:%Y-%m-%d %H:%M}", fontsize=13, fontweight="bold",
                 x=0.01, ha="left")
    bh = batch_health
    inf = system.inference
    api = worst(inf.status, system.gateway.status) if system.gateway is not None else inf.status
    stats = inf.inference_stats
    week = bh.stats if bh else None
    tiles: list[tuple[str, str, Health | None]] = [
        ("API", str(api), api),
        ("Batch processing", str(bh.status) if bh else "UNKNOWN", bh.status if bh else Health.UNHEALTHY),
        ("Active alerts", "—" if alerts is None else str(len(alerts)),
         None if alerts is None else (Health.UNHEALTHY if alerts else Health.HEALTHY)),
        ("Last batch run", f"{week.last_run_age_hours:.1f} h ago" if week and week.HasField("last_run_at")
         else "never", None),
        ("Runs (7 days)", f"{week.runs:,}" if week else "—", None),
        ("Images (7 days)", f"{week.images:,}" if week else "—", None),
        ("Batch success (7 days)", f"{week.success_rate:.1f}%" if week else "—",
         None if week is None else (Health.HEALTHY if week.success_rate >= bh.success_rate_min  # type: ignore[union-attr]
                                    else Health.UNHEALTHY)),
        ("Failed (7 days)", f"{week.failed:,}" if week else "—", None),
        ("API requests", f"{stats.total_requests:,}" if stats else "—", None),
        ("API success rate", f"{stats.success_rate:.1f}%" if stats else "—", None),
        ("API avg latency", f"{stats.average_latency_ms:.0f} ms" if stats else "—", None),
        ("API uptime", stats.uptime_human if stats else "—", None),
    ]
    axes = fig.subplots(3, 4)
    for ax, (label, value, status) in zip(axes.flat, tiles, strict=True):
        ax.set_xticks([])
        ax.set_yticks([])
        color = STATUS_COLORS[status] if status else "#263238"
        ax.set_facecolor("#f5f7fa")
        for spine in ax.spines.values():
            spine.set_color(color if status else "#d5dae1")
            spine.set_linewidth(2 if status else 1)
        ax.text(0.5, 0.62, value, ha="center", va="center", fontsize=17, fontweight="bold", color=color,
                transform=ax.transAxes)
        ax.text(0.5, 0.22, label, ha="center", va="center", fontsize=10, color="#455a64", transform=ax.transAxes)
    return fig

"""A run's files, in the formats of the monitoring guide (docs/monitoring-and-logging-guide.md),
which users' scripts and dashboards read:

- results/batch_results/batch_results_<YYYYMMDD_HHMMSS>.csv: filename,category,confidence,status,timestamp
- results/batch_results/batch_summary_<YYYYMMDD_HHMMSS>.json: timestamp, total_processed, successful,
  failed, categories, then job id, duration and the details the guide's summary lacked
- logs/batch_<YYYYMMDD_HHMMSS>.log: the guide's wording, one block per image

CSV status is "success", "uncertain" or "error" (the guide's word for an image that could not be
classified: the monitoring guide greps for it). The CSV grows while the job runs and is rebuilt
from the jobs database when it ends, so it is complete and duplicate-free even after a crash.

File names are data, never markup: a CSV cell that a spreadsheet would run as a formula (it begins
with =, +, -, @, tab or carriage return) is written with a leading ' (OWASP's CSV injection rule;
FASHION_BATCH_CSV_ESCAPE_FORMULAS=false turns it off), and the per-run log escapes control
characters in names and reasons, so a name cannot forge log lines.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from services.batch.records import STAMP_FORMAT, FileRecord, JobRecord, Outcome
from services.common.config import CommonSettings
from services.common.logs import DATE_FORMAT, close_file_logger, file_logger
from services.common.retention import prune_files

RESULTS_SUBDIR = "batch_results"
CSV_COLUMNS = ("filename", "category", "confidence", "status", "timestamp")
CSV_STATUS = {Outcome.SUCCESS: "success", Outcome.UNCERTAIN: "uncertain", Outcome.FAILED: "error"}
RULE = "=" * 60
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """`text` with control characters (newlines, escape sequences, line separators) written as Python
    escapes: "a\\nb" for a newline."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def formula_safe(cell: str) -> str:
    """A cell a spreadsheet shows as text: a leading ' where it would start a formula."""
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell


@dataclass(frozen=True)
class RunFiles:
    csv: Path
    summary: Path
    log: Path

    @classmethod
    def of(cls, stamp: str, results_dir: Path, log_dir: Path) -> RunFiles:
        folder = Path(results_dir) / RESULTS_SUBDIR
        return cls(folder / f"batch_results_{stamp}.csv", folder / f"batch_summary_{stamp}.json",
                   Path(log_dir) / f"batch_{stamp}.log")


# The per-run files, by name (never the service's own rotating logs, batch_service*.log).
RUN_LOG_PATTERNS = ("batch_[0-9]*.log*", "batch_runner_[0-9]*.log*")
RUN_RESULT_PATTERNS = ("batch_results_[0-9]*.csv", "batch_summary_[0-9]*.json")


def prune_run_files(settings: CommonSettings, results_dir: Path) -> int:
    """Delete per-run logs, CSV results and JSON summaries older than FASHION_RETENTION_DAYS; how many."""
    return (prune_files(settings.log_dir, RUN_LOG_PATTERNS, settings.retention_days)
            + prune_files(Path(results_dir) / RESULTS_SUBDIR, RUN_RESULT_PATTERNS, settings.retention_days))


def display_name(source: str, input_dir: str) -> str:
    """A file as the CSV and log name it: its path relative to the job's input folder."""
    if input_dir == ".":
        return source
    prefix = input_dir + "/"
    return source[len(prefix):] if source.startswith(prefix) else source


def local_iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else ""


def csv_row(name: str, outcome: Outcome, category: str, confidence: float | None, when: str) -> list[str]:
    failed = outcome == Outcome.FAILED
    return [name, "" if failed else category, "" if failed or confidence is None else f"{confidence:.4f}",
            CSV_STATUS[outcome], when]


def csv_rows(files: list[FileRecord], input_dir: str) -> list[list[str]]:
    return [csv_row(display_name(f.source, input_dir), Outcome(f.outcome), f.category, f.confidence,
                    local_iso(f.finished_at)) for f in files]


def append_csv(path: Path, rows: list[list[str]], escape_formulas: bool = True) -> None:
    """Add rows while the job runs (the header first when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        _write_rows(f, rows, new, escape_formulas)


def write_csv(path: Path, rows: list[list[str]], escape_formulas: bool = True) -> None:
    """Replace the CSV atomically with exactly these rows."""
    buf = io.StringIO(newline="")
    _write_rows(buf, rows, True, escape_formulas)
    _write_atomic(path, buf.getvalue())


def _write_rows(f: io.TextIOBase, rows: list[list[str]], header: bool, escape_formulas: bool) -> None:
    writer = csv.writer(f)
    if header:
        writer.writerow(CSV_COLUMNS)
    writer.writerows([[formula_safe(cell) for cell in row] for row in rows] if escape_formulas else rows)


def summary(job: JobRecord, files: RunFiles, errors: list[FileRecord], skipped: list[FileRecord],
            data_root: Path) -> dict[str, object]:
    c = job.counts
    return {
        "timestamp": job.stamp,
        "total_processed": c.processed,
        "successful": c.successful,
        "failed": c.failed,
        "categories": dict(sorted(c.categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        "job_id": job.job_id,
        "duration_seconds": round(job.duration_s(), 3),
        "state": job.state.value,
        "error": job.error,
        "trigger": job.trigger,
        "uncertain": c.uncertain,
        "skipped": job.skipped,
        "not_processed": c.unprocessed,
        "total_images": job.total,
        "min_confidence": job.min_confidence,
        "mode": job.mode,
        "input_dir": str(data_root / job.input_dir),
        "output_dir": str(data_root / job.output_dir),
        "started_at": local_iso(job.started_at),
        "finished_at": local_iso(job.finished_at),
        "results_csv": str(files.csv),
        "log_file": str(files.log),
        "errors": [{"filename": display_name(f.source, job.input_dir), "error": f.error} for f in errors],
        "skipped_files": [{"filename": display_name(f.source, job.input_dir), "reason": f.error} for f in skipped],
    }


def write_summary(path: Path, content: dict[str, object]) -> None:
    _write_atomic(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class LogEntry:
    """One image's block in the per-run log."""

    index: int
    name: str
    outcome: Outcome
    category: str
    confidence: float | None
    error: str
    where: str
    """The last line: where the file went ("✓ Moved to: ...")."""


class RunLog:
    """logs/batch_<stamp>.log, in the monitoring guide's wording. Appends, so a resumed job continues its log."""

    def __init__(self, path: Path, job_id: str, settings: CommonSettings) -> None:
        self.path = path
        self._log = file_logger(path, f"batch.run.{job_id}", settings)

    def close(self) -> None:
        close_file_logger(self._log)

    def line(self, message: str, *args: object) -> None:
        """One record; text arguments (names, reasons) with their control characters escaped."""
        self._log.info(message, *(printable(a) if isinstance(a, str) else a for a in args))

    def banner(self, title: str) -> None:
        self.line(RULE)
        self.line(title)
        self.line(RULE)

    def started(self, job: JobRecord, input_display: str, output_display: str) -> None:
        self.banner("BATCH PROCESSING STARTED")
        self.line("Job: %s (trigger: %s, mode: %s)", job.job_id, job.trigger, job.mode)
        self.line("Input folder: %s%s", input_display, " (recursive)" if job.recursive else "")
        self.line("Output folder: %s", output_display)

    def file_results(self, entries: list[LogEntry], total: int, min_confidence: float | None) -> None:
        """One block per image, the monitoring guide's lines. Written as one record per group (with
        each line's timestamp) so that thousands of images do not cost thousands of log records."""
        stamp = f"\n[{datetime.now().strftime(DATE_FORMAT)}] "
        lines: list[str] = []
        for e in entries:
            lines.append(f"\nProcessing [{e.index}/{total}]: {printable(e.name)}")
            if e.outcome == Outcome.SUCCESS:
                lines.append(f"  ✓ Category: {e.category} (confidence: {100 * (e.confidence or 0):.1f}%)")
            elif e.outcome == Outcome.UNCERTAIN:
                lines.append(f"  ⚠ Uncertain: {e.category} (confidence: {100 * (e.confidence or 0):.1f}%, "
                             f"below {100 * (min_confidence or 0):.1f}%)")
            if e.error:
                lines.append(f"  ✗ Error: {printable(e.error)}")
            lines.append(f"  {printable(e.where)}")
        if lines:
            self._log.info("%s", stamp.join(lines))

    def finished(self, job: JobRecord, files: RunFiles) -> None:
        c = job.counts
        title = {"succeeded": "BATCH PROCESSING COMPLETED", "cancelled": "BATCH PROCESSING CANCELLED"}.get(
            job.state.value, "BATCH PROCESSING FAILED")
        self.line("")
        self.banner(title)
        if job.error:
            self.line("✗ %s", job.error)
        self.line("Total processed: %d of %d images", c.processed, job.total)
        self.line("Successful: %d", c.successful)
        self.line("Uncertain: %d", c.uncertain)
        self.line("Failed: %d", c.failed)
        if c.unprocessed:
            self.line("Not processed (left in place): %d", c.unprocessed)
        if job.skipped:
            self.line("Skipped (not images, left in place): %d", job.skipped)
        for category, n in sorted(c.categories.items(), key=lambda kv: (-kv[1], kv[0])):
            self.line("  %s: %d", category, n)
        self.line("Duration: %.1f seconds", job.duration_s())
        self.line("Results saved to: %s", files.csv)
        self.line("Summary saved to: %s", files.summary)
        self.line(RULE)


class RunnerLog:
    """logs/batch_runner_<stamp>.log: one run of the batch runner (a scheduled run of the Batch service, or
    `fashion batch run` from cron), as the guide's scheduler log: started, the job(s), the outcome."""

    def __init__(self, settings: CommonSettings) -> None:
        stamp = datetime.now().strftime(STAMP_FORMAT)
        self.path = settings.log_dir / f"batch_runner_{stamp}.log"
        self._log = file_logger(self.path, f"batch.runner.{stamp}", settings)

    def close(self) -> None:
        close_file_logger(self._log)

    def line(self, message: str, *args: object) -> None:
        self._log.info(message, *(printable(a) if isinstance(a, str) else a for a in args))

    def started(self, **facts: str) -> None:
        """The banner, then one "Name: value" line per fact (trigger, schedule, inbox, ...)."""
        self.line(RULE)
        self.line("BATCH RUNNER STARTED")
        self.line(RULE)
        for name, value in facts.items():
            self.line("%s: %s", name.replace("_", " ").capitalize(), value)

    def outcome(self, job: JobRecord) -> None:
        c = job.counts
        self.line("Batch job %s %s: %d images processed (%d successful, %d uncertain, %d failed) in %.1fs",
                  job.job_id, job.state.name, c.processed, c.successful, c.uncertain, c.failed, job.duration_s())
        if job.error:
            self.line("✗ Batch failed: %s", job.error)
        else:
            self.line("✓ Batch completed successfully")

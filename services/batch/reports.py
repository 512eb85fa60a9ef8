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

Where these files are written, links are not followed where uploaders could have made them (ResultsFolder):
the results folder may lie in the data root (FASHION_RESULTS_DIR=/data/results in the containers).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fashion.client.text import printable
from services.batch.paths import DataRoot
from services.batch.records import STAMP_FORMAT, FileRecord, JobRecord, Outcome
from services.batch.tree import FolderRefused, OpenFolders, join
from services.common.config import BatchSettings, CommonSettings
from services.common.logs import DATE_FORMAT, close_file_logger, file_logger
from services.common.retention import prune_files

log = logging.getLogger(__name__)
RESULTS_SUBDIR = "batch_results"
CSV_COLUMNS = ("filename", "category", "confidence", "status", "timestamp")
CSV_STATUS = {Outcome.SUCCESS: "success", Outcome.UNCERTAIN: "uncertain", Outcome.FAILED: "error"}
RULE = "=" * 60
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def formula_safe(cell: str) -> str:
    """A cell a spreadsheet shows as text: a leading ' where it would start a formula."""
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell


MAX_LINKS = 40  # links followed on the way to a configured folder, as the kernel's limit (ELOOP)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ResultsRefused(OSError):
    """A run's file cannot be written without following a link that uploaders could have made."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, without "[Errno N]"


class ResultsFolder:
    """<results_dir>/batch_results, where a run's CSV and summary go, opened anew for each write.

    The rule: the configured results folder is the operator's path, and so are the links on the way to it
    outside the data root (/var/results -> /mnt/disk is followed). From the data root down, anyone who may
    write to the data root could have made a link, so none is followed there: those folders are opened one
    at a time with O_NOFOLLOW from the data root's descriptor (tree.OpenFolders), and
    FASHION_RESULTS_DIR=/data/results (the containers) swapped for a link is refused. batch_results is never
    followed. Links outside the root are resolved at each write: only the operator can change them.
    """

    def __init__(self, results_dir: Path, root: DataRoot | None) -> None:
        self.results_dir = Path(results_dir)
        self.root = root
        """None (only showing paths): the results folder is taken as the operator's, links included."""
        self.shown = self.results_dir / RESULTS_SUBDIR
        """As configured (results/batch_results): how logs and summaries name it."""

    def __str__(self) -> str:
        return str(self.shown)

    @contextmanager
    def opened(self, create: bool = True) -> Iterator[int]:
        """The folder's descriptor (created if missing and `create`), closed at exit. Raises ResultsRefused
        naming the link (errno ENOENT when missing), or OSError."""
        inside, real = _locate(self.results_dir, self.root)
        if inside is not None:
            assert self.root is not None
            with OpenFolders(self.root) as folders:
                try:
                    fd = folders.folder(join(inside, RESULTS_SUBDIR), create)
                except FolderRefused as exc:
                    raise ResultsRefused(exc.errno, f"cannot write in the results folder {self.shown}: "
                                                    f"{exc.strerror}") from exc
                yield fd
            return
        if create:
            real.mkdir(parents=True, exist_ok=True)  # the operator's folder, its links resolved
        results_fd = os.open(real, _DIR_FLAGS)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(RESULTS_SUBDIR, dir_fd=results_fd)
            try:
                fd = os.open(RESULTS_SUBDIR, _DIR_FLAGS, dir_fd=results_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP or _is_link(results_fd, RESULTS_SUBDIR):
                    raise ResultsRefused(errno.ELOOP, f"cannot write in the results folder {self.shown}: it is a "
                                                      "symbolic link (links are not followed)") from exc
                raise
        finally:
            os.close(results_fd)
        try:
            yield fd
        finally:
            os.close(fd)

    def file(self, name: str) -> ResultFile:
        return ResultFile(self, name)


@dataclass(frozen=True)
class ResultFile:
    """A run's CSV or summary: its name in its ResultsFolder; str() is its path as configured."""

    folder: ResultsFolder
    name: str

    def __str__(self) -> str:
        return str(self.folder.shown / self.name)


def _locate(folder: Path, root: DataRoot | None) -> tuple[str | None, Path]:
    """Where the configured `folder` is: (its path relative to the data root, None outside it; its path with
    the links outside the root resolved). Links are followed as the kernel would (.. included) up to the data
    root, never below it (see ResultsFolder)."""
    limit = root.real if root is not None else None
    pending = [part for part in reversed(os.path.join(os.getcwd(), folder).split("/")) if part]
    current, links = Path("/"), 0
    while pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        if limit is not None and current.is_relative_to(limit):  # maybe made by an uploader: never followed
            current = candidate
            continue
        try:
            target = os.readlink(candidate)
        except OSError:  # not a link (or missing: created at the first write)
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise ResultsRefused(errno.ELOOP, f"{folder}: too many levels of symbolic links")
        if target.startswith("/"):
            current = Path("/")
        pending.extend(part for part in reversed(target.split("/")) if part)
    if root is not None and current.is_relative_to(root.real):
        return root.relative(current), current
    return None, current


def _is_link(folder_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class RunFiles:
    csv: ResultFile
    summary: ResultFile
    log: Path

    @classmethod
    def of(cls, stamp: str, results_dir: Path, log_dir: Path, root: DataRoot | None = None) -> RunFiles:
        """The run's files; `root` (the data root) is needed to write them (ResultsFolder), not to show them."""
        folder = ResultsFolder(results_dir, root)
        return cls(folder.file(f"batch_results_{stamp}.csv"), folder.file(f"batch_summary_{stamp}.json"),
                   Path(log_dir) / f"batch_{stamp}.log")


# The per-run files, by name (never the service's own rotating logs, batch_service*.log).
RUN_LOG_PATTERNS = ("batch_[0-9]*.log*", "batch_runner_[0-9]*.log*")
RUN_RESULT_PATTERNS = ("batch_results_[0-9]*.csv", "batch_summary_[0-9]*.json")


def prune_run_files(settings: BatchSettings, results_dir: Path) -> int:
    """Delete per-run logs, CSV results and JSON summaries older than FASHION_RETENTION_DAYS; how many."""
    removed = prune_files(settings.log_dir, RUN_LOG_PATTERNS, settings.retention_days)
    if settings.retention_days <= 0:
        return removed
    try:
        with ResultsFolder(results_dir, DataRoot(Path(settings.data_root))).opened(create=False) as folder:
            # Through the folder's descriptor: a results folder swapped for a link meanwhile is not followed.
            return removed + prune_files(Path(f"/proc/self/fd/{folder}"), RUN_RESULT_PATTERNS, settings.retention_days,
                                         shown=str(Path(results_dir) / RESULTS_SUBDIR))
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # none yet: nothing to delete
            log.warning("Old results not deleted: %s", exc)
        return removed


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


def append_csv(target: ResultFile, rows: list[list[str]], escape_formulas: bool = True) -> None:
    """Add rows while the job runs (the header first when the file is new). A link or a special file under its
    name is refused: the CSV is written again from the jobs database when the job ends."""
    with target.folder.opened() as folder:
        try:  # O_NONBLOCK: a FIFO planted under the name is refused rather than waited on
            fd = os.open(target.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o666, dir_fd=folder)
        except OSError as exc:
            raise _refused(target, exc, folder) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link would append to another file
            os.close(fd)
            raise ResultsRefused(errno.EPERM, f"{target} is not a file of its own (a hard link or a special file): "
                                              "not written")
        buf = io.StringIO(newline="")
        _write_rows(buf, rows, st.st_size == 0, escape_formulas)
        with open(fd, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())


def write_csv(target: ResultFile, rows: list[list[str]], escape_formulas: bool = True) -> None:
    """Replace the CSV atomically with exactly these rows."""
    buf = io.StringIO(newline="")
    _write_rows(buf, rows, True, escape_formulas)
    _write_atomic(target, buf.getvalue())


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


def write_summary(target: ResultFile, content: dict[str, object]) -> None:
    _write_atomic(target, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(target: ResultFile, text: str) -> None:
    """A new file under a random name (never a link planted under a name guessed from the time), then renamed
    over the target: the rename replaces whatever entry has its name, a link included, without following it."""
    with target.folder.opened() as folder:
        tmp = f".{target.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder)
        try:
            with open(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            raise


def _refused(target: ResultFile, exc: OSError, folder: int) -> OSError:
    """The error of a failed open: ResultsRefused naming the link when the name is one."""
    if exc.errno == errno.ELOOP or _is_link(folder, target.name):
        return ResultsRefused(errno.ELOOP, f"{target} is a symbolic link (links are not followed in the "
                                           "results folder): not written")
    return exc


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

"""One job, start to end: scan, classify through the Inference service, sort, report.

The same JobRunner runs jobs in the Batch service and in `fashion batch run` (embedded).

Pipeline: chunks of images are read and sent to the Inference service (ClassifyBatch), several
in flight; their results are sorted in order, one chunk at a time, in a worker thread:
destinations recorded (write-ahead), files moved, folders fsynced, rows marked done, then the
per-run log and CSV appended. A crash leaves every row pending, moving or done; a restarted
runner finishes the moving rows from their records before going on (see store.py, mover.py).

Files are reached only through folders opened from the data root down without following links
(tree.py), afresh for each read pass and each sorted group: a folder swapped for a link mid-job
makes its files fail with the reason and stay untouched, and the job goes on with the rest.
A job's end state is recorded before its reports are written, so a restart that only has the
reports left to write ends the job in that state (a failure is never turned into a success).

A job is run by one process at a time: an flock on <db folder>/locks/<job_id>.lock, which the
kernel releases when the process dies, so a restarted service can adopt the job at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from fashion.client import AsyncInferenceClient, ChannelOptions
from services.batch import failpoints, reports
from services.batch.classifying import ImageAnswer, InferenceRefused, RemoteClassifier
from services.batch.events import FileUpdate, JobEvents, JobUpdate
from services.batch.mover import (
    FAILED_FOLDER,
    UNCERTAIN_FOLDER,
    FileMover,
    Resume,
    SourceNotRemovable,
    category_folder,
    unique_name,
)
from services.batch.paths import DataRoot
from services.batch.records import FileDone, FilePlan, FileRecord, JobRecord, JobState, Outcome
from services.batch.reports import RunFiles, RunLog
from services.batch.scanner import FolderScan, scan_folder
from services.batch.sharding import Shard
from services.batch.store import JobStore
from services.batch.tree import FolderRefused, OpenFolders, basename, join, lstat_or_none, parent
from services.common import metrics
from services.common.config import BatchSettings
from services.common.security import token_refused

log = logging.getLogger(__name__)
T = TypeVar("T")
MESSAGE_OVERHEAD = 64 * 1024  # room for protobuf framing around the image bytes of one call
CANCEL_POLL_S = 1.0
SORT_GROUP_MAX = 1024  # images sorted (recorded, moved, fsynced) together at most
MIB = 1024 * 1024


class JobBusy(RuntimeError):
    """Another process (or task) is running this job."""


class _Cancelled(Exception):
    """The job's cancellation was requested."""


class _InputMissing(Exception):
    """The job's input folder does not exist (any more)."""


class _Untouchable(str):
    """Why a file could not be read because of its folder (swapped for a link, gone): the file is
    left exactly where it is, not moved to _failed/."""


def default_db_path(settings: BatchSettings) -> Path:
    return settings.batch_db or Path(settings.data_root) / ".batch" / "jobs.db"


class JobLock:
    """An exclusive, non-blocking flock per job; the kernel drops it when its process dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def try_acquire(cls, folder: Path, job_id: str) -> JobLock | None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self, remove: bool = False) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)


@dataclass
class _Chunk:
    rows: list[FileRecord]
    data: list[bytes | str]
    """Per row: the image bytes, or why the file could not be read (an _Untouchable: not to be moved)."""
    verdicts: asyncio.Future[list[ImageAnswer]] | None
    """The Inference service's answers for the readable ones (None when none is readable)."""


class JobRunner:
    """Runs jobs of one data root against one Inference service."""

    def __init__(self, settings: BatchSettings, store: JobStore, events: JobEvents | None = None,
                 inference: AsyncInferenceClient | None = None) -> None:
        self.settings = settings
        self.store = store
        self.events = events or JobEvents()
        self.root = DataRoot(Path(settings.data_root))
        self.lock_dir = store.path.parent / "locks"
        self.mover = FileMover(settings.batch_fsync)
        self._inference = inference
        self.max_image_bytes = settings.max_message_bytes - MESSAGE_OVERHEAD

    def inference_client(self) -> AsyncInferenceClient:
        if self._inference is None:
            self._inference = AsyncInferenceClient(ChannelOptions.from_env(
                self.settings.inference_address, timeout_s=self.settings.batch_inference_timeout_s,
                max_message_bytes=self.settings.max_message_bytes))
        return self._inference

    async def close(self) -> None:
        self.mover.close()
        if self._inference is not None:
            await self._inference.close()

    async def run(self, job_id: str, cancel: asyncio.Event | None = None, lock: JobLock | None = None) -> JobRecord:
        """Run (or resume) the job to its end. Raises JobBusy when another process runs it.
        Cancelling the task (service shutdown) leaves the job resumable."""
        lock = lock or JobLock.try_acquire(self.lock_dir, job_id)
        if lock is None:
            raise JobBusy(f"job {job_id} is being run by another process")
        finished = False
        try:
            job = self.store.get(job_id)
            if job.state.finished:
                finished = True
                return job
            job = await _JobRun(self, job, cancel or asyncio.Event()).execute()
            finished = job.state.finished
            return job
        finally:
            lock.release(remove=finished)


class _JobRun:
    """One execution of one job (a resumed job gets a new one)."""

    def __init__(self, runner: JobRunner, job: JobRecord, cancel: asyncio.Event) -> None:
        self.runner = runner
        self.settings = runner.settings
        self.store = runner.store
        self.root = runner.root
        self.job = job
        self.cancel = cancel
        self.copy = job.mode == "copy"
        self.phase = ""
        self._folder_names: dict[str, set[str]] = {}
        self.recovery_failures: list[str] = []
        """Why interrupted transfers could not be finished (their files are left in place)."""
        self.files: RunFiles
        self.log: RunLog

    # --- lifecycle -------------------------------------------------------------------------------

    async def execute(self) -> JobRecord:
        resumed = self.job.stamp is not None
        self.job = await _io(self.store.start, self.job.job_id)
        assert self.job.stamp is not None
        self.files = RunFiles.of(self.job.stamp, self.settings.results_dir, self.settings.log_dir)
        self.log = RunLog(self.files.log, self.job.job_id, self.settings)
        try:
            self._set_phase("running")
            if self.job.ending is not None:  # a run before ended it; only its reports are left to write
                state, error = self.job.ending, self.job.error
            else:
                state, error = await self._run(resumed)
            job = await _shielded_io(self._finalize, state, error)
            self._publish(job, message=state.name.lower())
            return job
        except asyncio.CancelledError:
            self.log.line("Interrupted (service stopping): the job resumes when the Batch service starts again")
            raise
        finally:
            self._set_phase("")
            self.log.close()

    async def _run(self, resumed: bool) -> tuple[JobState, str]:
        """Everything up to the end state; the job's own failures become FAILED with the reason."""
        if self.job.cancel_requested:
            self.cancel.set()
        watcher = asyncio.ensure_future(self._watch_cancel())
        remote = RemoteClassifier(
            self.runner.inference_client(), self.settings.batch_inference_timeout_s,
            self.settings.batch_retry_initial_s, self.settings.batch_retry_max_s,
            on_wait=self._inference_down, on_ready=self._inference_back)
        try:
            self._announce(resumed)
            info = await self._or_cancel(remote.wait_ready())
            self.log.line("✓ API is healthy and ready")
            self.log.line("Model: %s v%s (min confidence %.2f)", info.name, info.version, info.min_confidence)
            if self.job.min_confidence is None:
                await _io(self.store.set_min_confidence, self.job.job_id, info.min_confidence)
            await _io(self.store.set_state, self.job.job_id, JobState.RUNNING)
            self._set_phase("running")
            self.job = await _io(self.store.get, self.job.job_id)
            if not self.job.scanned:
                await self._scan()
            else:
                await _io(self._recover_all)
                rows = await _io(self.store.files, self.job.job_id)
                await _io(reports.write_csv, self.files.csv, reports.csv_rows(rows, self.job.input_dir),
                          self.settings.batch_csv_escape_formulas)
            await self._process(remote)
            if self.recovery_failures:
                return JobState.FAILED, self._recovery_error()
            return JobState.SUCCEEDED, ""
        except _Cancelled:
            return JobState.CANCELLED, "cancelled on request"
        except InferenceRefused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                return JobState.FAILED, token_refused(self.settings, "the Inference service", exc.details)
            return JobState.FAILED, f"the Inference service refused the job: {exc}"
        except _InputMissing as exc:
            return JobState.FAILED, str(exc)
        except Exception as exc:
            log.exception("Job %s failed", self.job.job_id)
            return JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}"
        finally:
            watcher.cancel()
            remote.close()

    def _announce(self, resumed: bool) -> None:
        if resumed:
            c = self.job.counts
            self.log.line("")
            self.log.banner("BATCH PROCESSING RESUMED")
            self.log.line("Job %s: %d of %d images were processed before the interruption",
                          self.job.job_id, c.processed, self.job.total)
        else:
            self.log.started(self.job, self.root.display(self.job.input_dir), self.root.display(self.job.output_dir))
        self._publish(self.job, message="resumed" if resumed else "started")

    async def _scan(self) -> None:
        found = await _io(self._list_input)
        shard = Shard.resolve(self.settings.batch_shard_index, self.settings.batch_shard_count)
        images = [rel for rel in found.images if shard.owns(rel)]
        skipped = [(rel, why) for rel, why in found.skipped if shard.owns(rel)]
        if shard.count > 1:
            self.log.line("Sorting %s of the folder", shard)
        self.job = await _io(self.store.add_files, self.job.job_id, images, skipped)
        self.log.line("Found %d images to process", self.job.total)
        left = []
        for f in await _io(self.store.files, self.job.job_id, (Outcome.SKIPPED,)):
            name = reports.display_name(f.source, self.job.input_dir)
            self.log.line("  - Skipped (left in place): %s: %s", name, f.error)
            left.append(FileUpdate(name, "", 0.0, Outcome.SKIPPED.value, f.source, f.error))
        if found.ignored:
            self.log.line("  - Ignored %d hidden or temporary files", found.ignored)
        metrics.BATCH_FILES.labels(Outcome.SKIPPED.value).inc(self.job.skipped)
        self._publish(self.job, files=tuple(left),
                      message=f"found {self.job.total} images; {self.job.skipped} other files skipped")

    def _list_input(self) -> FolderScan:
        store_folder = Path(os.path.realpath(self.store.path.parent))
        exclude = {self.job.output_dir}
        if store_folder.is_relative_to(self.root.real):
            exclude.add(self.root.relative(store_folder))
        try:
            with OpenFolders(self.root) as folders:
                return scan_folder(folders, self.job.input_dir, self.job.recursive, exclude,
                                   self.settings.batch_min_file_age_s)
        except OSError as exc:
            shown = self.root.display(self.job.input_dir)
            reason = exc.strerror if isinstance(exc, FolderRefused) else f"{shown} cannot be read: {exc.strerror}"
            raise _InputMissing(f"the input folder cannot be used: {reason}") from exc

    def _finalize(self, state: JobState, error: str) -> JobRecord:
        """The end state is recorded first (a restart finishes the job in it), then the reports, then the
        terminal state: a crash in between only makes the next start write the reports again."""
        job_id, now = self.job.job_id, time.time()
        self.store.set_ending(job_id, state, error)
        self._recover_all()  # transfers left recorded as moving when the job stopped early
        if self.recovery_failures and state != JobState.FAILED:
            state, error = JobState.FAILED, _joined(error, self._recovery_error())
        self.store.release_pending(job_id, now)
        job = dataclasses.replace(self.store.get(job_id), state=state, error=error, finished_at=now)
        try:
            self._write_reports(job)
        except OSError as exc:
            log.error("Job %s: could not write its results: %s", job_id, exc)
            state, error = JobState.FAILED, _joined(error, f"could not write the job's results: {exc}")
            self.store.set_ending(job_id, state, error)
            job = dataclasses.replace(job, state=state, error=error)
            with contextlib.suppress(OSError):
                self._write_reports(job)  # the summary may still fit where the CSV did not
        failpoints.reached("finishing")
        job = self.store.finish(job_id, state, error, now)
        self.log.finished(job, self.files)
        metrics.BATCH_JOBS.labels(state.value).inc()
        metrics.BATCH_JOB_DURATION.observe(job.duration_s())
        metrics.BATCH_LAST_RUN.set(now)
        log.info("Job %s %s: %d processed (%d successful, %d uncertain, %d failed), %d skipped in %.1fs%s",
                 job_id, state.name, job.counts.processed, job.counts.successful, job.counts.uncertain,
                 job.counts.failed, job.skipped, job.duration_s(), f": {error}" if error else "")
        return job

    def _write_reports(self, job: JobRecord) -> None:
        job_id = job.job_id
        reports.write_csv(self.files.csv, reports.csv_rows(self.store.files(job_id), job.input_dir),
                          self.settings.batch_csv_escape_formulas)
        content = reports.summary(job, self.files, self.store.files(job_id, (Outcome.FAILED,)),
                                  self.store.files(job_id, (Outcome.SKIPPED,)), self.root.root)
        reports.write_summary(self.files.summary, content)

    def _recovery_error(self) -> str:
        n = len(self.recovery_failures)
        return (f"could not finish {n} transfer{'s' if n > 1 else ''} interrupted by a crash (left in place): "
                f"{self.recovery_failures[0]}")

    # --- the pipeline ----------------------------------------------------------------------------

    async def _process(self, remote: RemoteClassifier) -> None:
        """Chunks go out in order, several in flight; their answers are sorted in order. Chunks whose
        answers are already back when a sort starts join it: one write-ahead commit and one round of
        folder fsyncs for all of them, so a slow disk batches more instead of stalling the pipeline."""
        in_flight: asyncio.Queue[_Chunk | BaseException | None] = asyncio.Queue(self.settings.batch_in_flight)
        producer = asyncio.ensure_future(self._send_chunks(remote, in_flight))
        taken: collections.deque[_Chunk | BaseException | None] = collections.deque()
        try:
            while True:
                item = taken.popleft() if taken else await self._or_cancel(in_flight.get())
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                group = [(item, await self._verdicts(item))]
                size = len(item.rows)
                while size < SORT_GROUP_MAX and not in_flight.empty():
                    more = in_flight.get_nowait()
                    if not isinstance(more, _Chunk) or (more.verdicts is not None and not more.verdicts.done()):
                        taken.append(more)
                        break
                    group.append((more, await self._verdicts(more)))
                    size += len(more.rows)
                job, updates = await _shielded_io(self._sort, group)
                if updates:
                    self._publish(job, files=tuple(updates))
        finally:
            producer.cancel()
            for pending in [*taken, *(in_flight.get_nowait() for _ in range(in_flight.qsize()))]:
                if isinstance(pending, _Chunk) and pending.verdicts is not None:
                    pending.verdicts.cancel()

    async def _verdicts(self, chunk: _Chunk) -> list[ImageAnswer]:
        return await self._or_cancel(chunk.verdicts) if chunk.verdicts is not None else []

    async def _send_chunks(self, remote: RemoteClassifier, out: asyncio.Queue[_Chunk | BaseException | None]) -> None:
        try:
            after = 0
            while rows := await _io(self.store.pending, self.job.job_id, after, 512):
                after = rows[-1].seq
                for group, data in await _io(self._read, rows):
                    images = [d for d in data if isinstance(d, bytes)]
                    verdicts = asyncio.ensure_future(remote.classify(images)) if images else None
                    await out.put(_Chunk(group, data, verdicts))
            await out.put(None)
        except Exception as exc:
            await out.put(exc)

    def _read(self, rows: list[FileRecord]) -> list[tuple[list[FileRecord], list[bytes | str]]]:
        """The files' bytes (or why one cannot be read), in chunks of at most batch_chunk_size images and
        batch_chunk_bytes bytes. Folders are opened afresh from the data root, links are not followed and
        FIFOs not waited on: the tree may have changed since the scan."""
        limit = self.runner.max_image_bytes
        chunk_bytes = min(self.settings.batch_chunk_bytes, limit)
        chunks: list[tuple[list[FileRecord], list[bytes | str]]] = [([], [])]
        size = 0
        with OpenFolders(self.root) as folders:
            for row in rows:
                data = self._read_one(folders, row.source, limit)
                n = len(data) if isinstance(data, bytes) else 0
                if chunks[-1][0] and (len(chunks[-1][0]) >= self.settings.batch_chunk_size or size + n > chunk_bytes):
                    chunks.append(([], []))
                    size = 0
                chunks[-1][0].append(row)
                chunks[-1][1].append(data)
                size += n
        return chunks

    @staticmethod
    def _read_one(folders: OpenFolders, source: str, limit: int) -> bytes | str:
        try:
            entry = folders.entry(source)
        except FolderRefused as exc:
            return _Untouchable(f"cannot read: {exc.strerror}")
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.folder)
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return "cannot read: not a regular file"
                if st.st_size > limit:
                    return f"too large to classify: {st.st_size / MIB:.1f} MiB (limit {limit / MIB:.1f} MiB)"
                return f.read()
        except OSError as exc:
            return f"cannot read: {'it is a symbolic link' if exc.errno == errno.ELOOP else exc.strerror or exc}"

    # --- sorting (in a worker thread) ------------------------------------------------------------

    def _sort(self, group: list[tuple[_Chunk, list[ImageAnswer]]]) -> tuple[JobRecord | None, list[FileUpdate]]:
        """Record, move, sync, mark done, then log and append the CSV. Returns what to publish."""
        start = time.perf_counter()
        decided: list[tuple[FileRecord, ImageAnswer]] = []
        untouchable: set[int] = set()
        for chunk, verdicts in group:
            answers = iter(verdicts)
            for row, data in zip(chunk.rows, chunk.data, strict=True):
                decided.append((row, next(answers) if isinstance(data, bytes) else ImageAnswer(error=data)))
                if isinstance(data, _Untouchable):
                    untouchable.add(row.seq)
        with OpenFolders(self.root) as folders:
            plans, in_place = self._plan(decided, untouchable, folders)
            failpoints.reached("planned")
            rows = {row.seq: row for row, _ in decided}
            moved = [self._transfer(p, rows[p.seq], folders) for p in plans.values() if p.seq not in in_place]
            self.runner.mover.sync_folders(self._folders_touched(decided, moved, folders))
        failpoints.reached("moved")
        now = time.time()
        done = {d.seq: d for d in [*moved, *in_place.values()]}
        self.store.done(self.job.job_id, list(done.values()), now)
        failpoints.reached("recorded")
        updates = self._report(decided, plans, done, now)
        metrics.BATCH_SORT_DURATION.observe(time.perf_counter() - start)
        return (self.store.get(self.job.job_id) if updates else None), updates

    def _plan(self, decided: list[tuple[FileRecord, ImageAnswer]], untouchable: set[int], folders: OpenFolders
              ) -> tuple[dict[int, FilePlan], dict[int, FileDone]]:
        """Destinations for a group, recorded (write-ahead) before anything moves. Returns every image's
        plan, and the images that stay where they are (in their folder already, or not to be touched)."""
        for _ in range(5):
            reserved = self.store.reserved_destinations()  # names other jobs are moving files to right now
            chosen: dict[str, set[str]] = {}
            plans: dict[int, FilePlan] = {}
            in_place: dict[int, FileDone] = {}
            for row, v in decided:
                outcome, category, confidence = self._judge(v)
                folder = join(self.job.output_dir, FAILED_FOLDER if outcome == Outcome.FAILED else
                              UNCERTAIN_FOLDER if outcome == Outcome.UNCERTAIN else category_folder(category))
                error, existing = v.error, None
                if row.seq in untouchable:
                    outcome = Outcome.FAILED
                elif folder != parent(row.source):
                    try:
                        existing = self._names(folder, folders)
                    except FolderRefused as exc:
                        outcome, error = Outcome.FAILED, _joined(v.error, f"cannot be moved: {exc.strerror}")
                if existing is None:
                    plans[row.seq] = FilePlan(row.seq, outcome, category, confidence, row.source, error)
                    in_place[row.seq] = FileDone(row.seq, outcome, row.source, error)
                    continue
                taken = chosen.get(folder)
                if taken is None:
                    taken = chosen[folder] = {basename(d) for d in reserved if parent(d) == folder}
                name = unique_name(basename(row.source), existing, taken)
                taken.add(name)
                plans[row.seq] = FilePlan(row.seq, outcome, category, confidence, join(folder, name), v.error)
            try:
                self.store.plan(self.job.job_id, [p for p in plans.values() if p.seq not in in_place])
            except sqlite3.IntegrityError:
                continue  # another job reserved one of these names meanwhile: choose again
            for folder, names in chosen.items():
                self._folder_names[folder] |= names
            return plans, in_place
        raise RuntimeError("could not reserve destinations: other jobs keep taking the same names")

    def _names(self, folder: str, folders: OpenFolders, refresh: bool = False) -> set[str]:
        """Names present in a destination folder, which is opened (created if needed) for every group;
        listed once per run and kept up to date with the files this run adds. A name taken behind our
        back is still never overwritten: link() refuses it and the file is renamed. Raises FolderRefused."""
        fd = folders.folder(folder, create=True)
        names = self._folder_names.get(folder)
        if names is None or refresh:
            names = self._folder_names[folder] = set(os.listdir(fd))
        return names

    def _judge(self, v: ImageAnswer) -> tuple[Outcome, str, float | None]:
        if v.error:
            return Outcome.FAILED, "", None
        threshold = self.job.min_confidence
        uncertain = v.confidence < threshold if threshold is not None else v.uncertain
        return (Outcome.UNCERTAIN if uncertain else Outcome.SUCCESS), v.category, v.confidence

    def _transfer(self, plan: FilePlan, row: FileRecord, folders: OpenFolders) -> FileDone:
        """Carry out one recorded plan; a destination taken meanwhile gets the next free name."""
        destination = plan.destination
        tag = f"{self.job.job_id}-{plan.seq}"
        for _ in range(1000):
            try:
                self.runner.mover.transfer(folders.entry(row.source), folders.entry(destination, create=True),
                                      self.copy, tag)
                return FileDone(plan.seq, plan.outcome, destination, plan.error)
            except FileExistsError:
                pass
            except OSError as exc:
                return self._left_in_place(plan, row, destination, exc, folders)
            try:
                destination = self._replan(plan.seq, row.source, parent(destination), folders)
            except FolderRefused as exc:
                return self._left_in_place(plan, row, destination, exc, folders)
            failpoints.reached("replanned")
        raise RuntimeError(f"no free name for {row.source} in {parent(destination)}")

    def _replan(self, seq: int, source: str, folder: str, folders: OpenFolders) -> str:
        while True:
            existing = self._names(folder, folders, refresh=True)
            reserved = {basename(d) for d in self.store.reserved_destinations() if parent(d) == folder}
            candidate = join(folder, unique_name(basename(source), existing, reserved))
            try:
                self.store.replan(self.job.job_id, seq, candidate)
            except sqlite3.IntegrityError:
                continue
            existing.add(basename(candidate))
            return candidate

    def _left_in_place(self, plan: FilePlan, row: FileRecord, destination: str, exc: OSError,
                       folders: OpenFolders) -> FileDone:
        with contextlib.suppress(FolderRefused):  # a refused folder was not touched: its file is still there
            if lstat_or_none(folders.entry(row.source)) is None:
                return FileDone(plan.seq, Outcome.FAILED, "", "the file disappeared before it could be moved")
        if isinstance(exc, FolderRefused):
            why = f"left untouched: {exc.strerror}"
        elif isinstance(exc, SourceNotRemovable):
            why = f"cannot be moved: {exc.strerror} (its copy in {self.root.display(parent(destination))} was removed)"
        else:
            verb = "copy" if self.copy else "move"
            why = f"cannot {verb} it to {self.root.display(destination)}: {exc.strerror or exc}"
        if plan.outcome != Outcome.FAILED:
            why = f"classified as {plan.category}, but {why}"
        return FileDone(plan.seq, Outcome.FAILED, row.source, _joined(plan.error, why))

    def _recover_all(self) -> None:
        with OpenFolders(self.root) as folders:
            self._recover(folders)

    def _recover(self, folders: OpenFolders) -> None:
        """Finish the transfers a crash interrupted, from their records. A transfer that cannot be finished
        leaves its file in place, is released for later jobs, and fails the job (recovery_failures)."""
        rows = self.store.in_flight(self.job.job_id)
        if not rows:
            return
        results = []
        for row in rows:
            try:
                results.append(self._resume(row, folders))
            except OSError as exc:
                self._recovery_failed(row, exc)
                results.append(FileDone(row.seq, Outcome.FAILED, row.source,
                                        f"could not finish the transfer interrupted by a crash: {exc.strerror or exc}"))
        touched = {parent(d.destination) for d in results if d.destination} | {parent(r.source) for r in rows}
        self.runner.mover.sync_folders(_open_only(folders, touched))
        self.store.done(self.job.job_id, results)
        self.log.line("Recovered %d transfers interrupted by a crash", len(results))

    def _resume(self, row: FileRecord, folders: OpenFolders) -> FileDone:
        """One interrupted transfer finished from its record. Raises OSError when it cannot be."""
        plan = FilePlan(row.seq, Outcome(row.outcome), row.category, row.confidence, row.destination, row.error)
        destination = folders.entry(row.destination, create=True)
        try:
            source = folders.entry(row.source)
        except FolderRefused as exc:
            # The source's folder was swapped: where its file went cannot be known. A copy already at the
            # destination is kept (removing it could lose the only one) and the job fails with the reason.
            at_destination = lstat_or_none(destination)
            if at_destination is None or not stat.S_ISREG(at_destination.st_mode):
                raise
            self._recovery_failed(row, exc)
            return FileDone(row.seq, plan.outcome, row.destination, _joined(
                row.error, f"{exc.strerror}: a copy may remain where that folder went"))
        state = self.runner.mover.complete(source, destination, self.copy, f"{self.job.job_id}-{row.seq}")
        failpoints.reached("recovering")
        if state == Resume.DONE:
            return FileDone(row.seq, plan.outcome, row.destination, row.error)
        if state == Resume.MISSING:
            return FileDone(row.seq, Outcome.FAILED, "",
                            "the file disappeared: neither at its source nor at its destination")
        return self._transfer(plan, row, folders)

    def _recovery_failed(self, row: FileRecord, exc: OSError) -> None:
        reason = f"{reports.display_name(row.source, self.job.input_dir)}: {exc.strerror or exc}"
        self.recovery_failures.append(reason)
        log.error("Job %s: could not finish the transfer of %s", self.job.job_id, reports.printable(reason))

    def _folders_touched(self, decided: list[tuple[FileRecord, ImageAnswer]], moved: list[FileDone],
                         folders: OpenFolders) -> list[int]:
        touched = {parent(d.destination) for d in moved if d.destination}
        if not self.copy:
            touched |= {parent(row.source) for row, _ in decided}
        return _open_only(folders, touched)

    def _report(self, decided: list[tuple[FileRecord, ImageAnswer]], plans: dict[int, FilePlan],
                done: dict[int, FileDone], now: float) -> list[FileUpdate]:
        """The per-run log and the CSV for one sorted group; the file updates when someone watches."""
        watched = self.runner.events.watched(self.job.job_id)
        entries: list[reports.LogEntry] = []
        rows: list[list[str]] = []
        updates: list[FileUpdate] = []
        when = reports.local_iso(now)
        counts: collections.Counter[str] = collections.Counter()
        for row, _ in decided:
            d, p = done[row.seq], plans[row.seq]
            name = reports.display_name(row.source, self.job.input_dir)
            confidence = p.confidence if d.outcome != Outcome.FAILED else None
            entries.append(reports.LogEntry(row.seq, name, d.outcome, p.category, confidence, d.error,
                                            self._where(row, d)))
            rows.append(reports.csv_row(name, d.outcome, p.category, confidence, when))
            counts[d.outcome.value] += 1
            if watched:
                updates.append(FileUpdate(name, p.category, confidence or 0.0, d.outcome.value, d.destination,
                                          d.error))
        self.log.file_results(entries, self.job.total, self.job.min_confidence)
        try:
            reports.append_csv(self.files.csv, rows, self.settings.batch_csv_escape_formulas)
        except OSError as exc:  # the CSV is written again from the database when the job ends
            log.warning("Job %s: could not append to %s: %s", self.job.job_id, self.files.csv, exc)
        for outcome, n in counts.items():
            metrics.BATCH_FILES.labels(outcome).inc(n)
        return updates

    def _where(self, row: FileRecord, d: FileDone) -> str:
        """The log's last line for a file: where it went."""
        if not d.destination:
            return "✗ Gone: the file is no longer there"
        shown = self.root.display(d.destination)
        if d.destination != row.source:
            return f"✓ {'Copied' if self.copy else 'Moved'} to: {shown}"
        return f"✗ Left in place: {shown}" if d.error else f"✓ Already in: {shown}"

    # --- state changes ---------------------------------------------------------------------------

    def _publish(self, job: JobRecord | None, files: tuple[FileUpdate, ...] = (), message: str = "") -> None:
        if job is not None and self.runner.events.watched(job.job_id):
            self.runner.events.publish(JobUpdate(job, files, message))

    def _inference_down(self, reason: str, delay: float) -> None:
        address = self.settings.inference_address
        error = f"waiting for the Inference service at {address}: {reason}; next attempt in {delay:.0f}s"
        self.store.set_state(self.job.job_id, JobState.WAITING, error)
        self._set_phase("waiting")
        metrics.BATCH_INFERENCE_WAITS.inc()
        self.log.line("✗ API not available (%s): retrying in %.0f seconds", reason, delay)
        log.warning("Job %s %s", self.job.job_id, error)
        self._publish(self.store.get(self.job.job_id), message=error)

    def _inference_back(self) -> None:
        self.store.set_state(self.job.job_id, JobState.RUNNING)
        self._set_phase("running")
        self.log.line("✓ API is healthy and ready")
        log.info("Job %s: the Inference service is back; resuming", self.job.job_id)
        self._publish(self.store.get(self.job.job_id), message="the Inference service is back")

    def _set_phase(self, phase: str) -> None:
        """Keeps the active-jobs gauge right across RUNNING and WAITING."""
        if phase == self.phase:
            return
        if self.phase:
            metrics.BATCH_JOBS_ACTIVE.labels(self.phase).dec()
        if phase:
            metrics.BATCH_JOBS_ACTIVE.labels(phase).inc()
        self.phase = phase

    async def _watch_cancel(self) -> None:
        """A cancel requested from another process (only the database is shared) reaches the job too."""
        while not self.cancel.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            if await _io(self.store.cancel_requested, self.job.job_id):
                self.cancel.set()

    async def _or_cancel(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless the job's cancellation comes first (then raise _Cancelled)."""
        task = asyncio.ensure_future(awaitable)
        if self.cancel.is_set():
            task.cancel()
            raise _Cancelled
        stop = asyncio.ensure_future(self.cancel.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        raise _Cancelled


def _joined(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second


def _open_only(folders: OpenFolders, rels: Iterable[str]) -> list[int]:
    """Descriptors of the folders that can still be reached (the others were not touched)."""
    fds = []
    for rel in rels:
        with contextlib.suppress(FolderRefused):
            fds.append(folders.folder(rel))
    return fds


async def _io(fn: Callable[..., T], *args: object) -> T:
    """Blocking work (SQLite, the filesystem) off the event loop."""
    return await asyncio.to_thread(fn, *args)


async def _shielded_io(fn: Callable[..., T], *args: object) -> T:
    """Like _io, and the work finishes even if the caller is cancelled: a chunk being moved when
    the service stops is completed, not left for recovery."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise

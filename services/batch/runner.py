"""One job, start to end: scan, classify through the Inference service, sort, report.

The same JobRunner runs jobs in the Batch service and in `fashion batch run` (embedded).

Pipeline: chunks of images are read and sent to the Inference service (ClassifyBatch), several
in flight; their results are sorted in order, one chunk at a time, in a worker thread (the
synchronous per-file work is filing.py's): destinations recorded (write-ahead), files moved,
folders fsynced, rows marked done, then the per-run log and CSV appended. A crash leaves every
row pending, moving or done; a restarted runner finishes the moving rows from their records
before going on (see store.py, mover.py). This module is the asynchronous orchestration: the job's
states, the chunks in flight, cancellation, outages of the Inference service, the reports.

Files are reached only through folders opened from the data root down without following links
(tree.py), afresh for each read pass and each sorted group: a folder swapped for a link mid-job
makes its files fail with the reason and stay untouched, and the job goes on with the rest.
A job's end state is recorded before its reports are written, so a restart that only has the
reports left to write ends the job in that state (a failure is never turned into a success).

A job is run by one process at a time (JobStore.lock_job: an flock with SQLite, a session-level
advisory lock with PostgreSQL; both end with the process), so a restarted service, or another
replica, can adopt the job at once. The runner claims the job's files a chunk at a time; with
PostgreSQL, replicas with nothing of their own to run help (assist): they claim and sort files
of the same job, with the same write-ahead records, but never start, scan or end it. The job's
runner takes over the files of helpers that died (finishing their transfers from their records)
and, before it ends the job, records its end state (no more plans from anyone) and waits until
no helper is transferring any of its files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from fashion.client import AsyncInferenceClient
from services.batch import failpoints, reports
from services.batch.classifying import ImageAnswer, InferenceRefused, RemoteClassifier
from services.batch.events import FileUpdate, JobEvents, JobUpdate
from services.batch.filing import JobFiling, joined_reasons
from services.batch.mover import FileMover, Resume
from services.batch.paths import DataRoot
from services.batch.records import FileIdentity, FileRecord, JobRecord, JobState, Outcome
from services.batch.reports import RunFiles, RunLog
from services.batch.scanner import FolderScan, scan_folder
from services.batch.sharding import Shard
from services.batch.store import JobClosed, JobLock, JobStore, StoreUnavailable
from services.batch.tree import Entry, FolderRefused, OpenFolders
from services.common import metrics
from services.common.config import BatchSettings
from services.common.security import client_options, token_refused

log = logging.getLogger(__name__)
T = TypeVar("T")
MESSAGE_OVERHEAD = 64 * 1024  # room for protobuf framing around the image bytes of one call
CANCEL_POLL_S = 1.0
SORT_GROUP_MAX = 1024  # images sorted (recorded, moved, fsynced) together at most
HELPERS_POLL_S = 0.2  # the job's runner waiting for its helpers (other replicas) to finish their files


class SessionBoundMover(FileMover):
    """A FileMover that starts no transfer (nor the finishing of one) once the store says this process's hold
    on its records is over (JobStore.check_session, StoreUnavailable): on PostgreSQL another replica may then
    be finishing the same transfers from their records, and two processes moving one file can leave it under
    two names or recorded as gone."""

    def __init__(self, fsync: bool, store: JobStore) -> None:
        super().__init__(fsync)
        self._store = store

    def transfer(self, source: Entry, destination: Entry, copy: bool, tag: str,
                 classified: FileIdentity | None = None) -> None:
        self._store.check_session()
        super().transfer(source, destination, copy, tag, classified)

    def complete(self, source: Entry, destination: Entry, copy: bool, tag: str,
                 classified: FileIdentity | None = None) -> Resume:
        self._store.check_session()
        return super().complete(source, destination, copy, tag, classified)


class JobBusy(RuntimeError):
    """Another process (or task) is running this job."""


class _Cancelled(Exception):
    """The job's cancellation was requested."""


class _OutOfSpace(Exception):
    """A destination's disk is full: every further transfer would fail as well; the job fails, saying so."""


class _InputMissing(Exception):
    """The job's input folder does not exist (any more)."""


@dataclass
class _Chunk:
    rows: list[FileRecord]
    data: list[bytes | str]
    """Per row: the image bytes, or why the file could not be read (a filing.Untouchable: not to be moved)."""
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
        self.mover = SessionBoundMover(settings.batch_fsync, store)
        self._inference = inference
        self.max_image_bytes = settings.max_message_bytes - MESSAGE_OVERHEAD

    def inference_client(self) -> AsyncInferenceClient:
        if self._inference is None:
            self._inference = AsyncInferenceClient(client_options(
                self.settings, self.settings.inference_address, timeout_s=self.settings.batch_inference_timeout_s))
        return self._inference

    async def close(self) -> None:
        self.mover.close()
        if self._inference is not None:
            await self._inference.close()

    async def run(self, job_id: str, cancel: asyncio.Event | None = None, lock: JobLock | None = None) -> JobRecord:
        """Run (or resume) the job to its end. Raises JobBusy when another process runs it.
        Cancelling the task (service shutdown) leaves the job resumable."""
        lock = lock or await _io(self.store.lock_job, job_id)
        if lock is None:
            raise JobBusy(f"job {job_id} is being run by another process")
        finished = False
        try:
            job = await _io(self.store.get, job_id)
            if job.state.finished:
                finished = True
                return job
            job = await _JobRun(self, job, cancel or asyncio.Event()).execute()
            finished = job.state.finished
            return job
        finally:
            lock.release(finished=finished)

    async def assist(self, job_id: str, cancel: asyncio.Event | None = None) -> int:
        """Help another process with its job (a store shared by replicas): claim and sort its files until
        none is left unclaimed, it ends, or `cancel`. Returns how many images this process sorted."""
        job = await _io(self.store.get, job_id)
        if (not self.store.shared or job.state not in (JobState.RUNNING, JobState.WAITING) or not job.scanned
                or job.stamp is None or job.ending is not None or job.cancel_requested):
            return 0
        with self.store.working():  # its claims and plans are this session's: no reconnecting meanwhile
            return await _JobRun(self, job, cancel or asyncio.Event(), leader=False).assist()


class _JobRun:
    """One execution of one job (a resumed job gets a new one)."""

    def __init__(self, runner: JobRunner, job: JobRecord, cancel: asyncio.Event, leader: bool = True) -> None:
        self.runner = runner
        self.leader = leader
        """The job's runner (it holds the job's lock: starts, scans and ends it), else a helper."""
        self.settings = runner.settings
        self.store = runner.store
        self.root = runner.root
        self.job = job
        self.cancel = cancel
        self.phase = ""
        self.files: RunFiles
        self.log: RunLog
        self.filing: JobFiling
        """The per-file work (filing.py), from the job's start on."""

    def _job_changed(self, job: JobRecord) -> None:
        """The job as the store now has it, for this run and its filing."""
        self.job = self.filing.job = job

    # --- lifecycle -------------------------------------------------------------------------------

    def _open_run_files(self) -> None:
        assert self.job.stamp is not None
        self.files = RunFiles.of(self.job.stamp, self.settings.results_dir, self.settings.log_dir, self.root)
        self.log = RunLog(self.files.log, self.job.job_id, self.settings)
        runner = self.runner
        self.filing = JobFiling(self.settings, self.store, self.root, runner.mover, runner.events,
                                runner.max_image_bytes, self.job, self.files, self.log)

    async def execute(self) -> JobRecord:
        resumed = self.job.stamp is not None
        self.job = await _io(self.store.start, self.job.job_id)
        self._open_run_files()
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
        except StoreUnavailable as exc:
            self.log.line("Interrupted (%s): the job resumes once the jobs database is back", str(exc))
            raise
        finally:
            self._set_phase("")
            self.log.close()

    async def assist(self) -> int:
        """Sort some of the files of a job another process runs (see JobRunner.assist)."""
        self._open_run_files()
        before = self.filing.sorted_count
        self.log.line("Worker %s (%s, pid %d) helps with job %s", self.store.worker, socket.gethostname(), os.getpid(),
                      self.job.job_id)
        log.info("Helping with job %s, run by another process", self.job.job_id)
        watcher = asyncio.ensure_future(self._watch_cancel())
        remote = self._remote_classifier()
        try:
            await self._or_cancel(remote.wait_ready())
            await self._process(remote)
        except (_Cancelled, JobClosed):
            pass
        except (asyncio.CancelledError, StoreUnavailable):
            raise
        except _OutOfSpace as exc:  # the job's runner meets it too, and fails the job saying so
            log.warning("Job %s: stopped helping: %s", self.job.job_id, exc)
        except Exception:
            log.exception("Job %s: helping failed", self.job.job_id)
        finally:
            watcher.cancel()
            remote.close()
            try:  # what this worker still holds is finished or handed back, not left for a takeover
                await _shielded_io(self._let_go)
            except StoreUnavailable:
                pass
            finally:
                self.log.line("Worker %s sorted %d images of job %s", self.store.worker,
                              self.filing.sorted_count - before, self.job.job_id)
                self.log.close()
        return self.filing.sorted_count - before

    def _remote_classifier(self) -> RemoteClassifier:
        """The Inference service as this run calls it: its deadline, retries with backoff, and this run's
        log lines when the service goes down and comes back."""
        return RemoteClassifier(
            self.runner.inference_client(), self.settings.batch_inference_timeout_s,
            self.settings.batch_retry_initial_s, self.settings.batch_retry_max_s,
            on_wait=self._inference_down, on_ready=self._inference_back)

    def _let_go(self) -> None:
        self.filing.recover_all()
        self.store.release_claims(self.job.job_id)

    async def _run(self, resumed: bool) -> tuple[JobState, str]:
        """Everything up to the end state; the job's own failures become FAILED with the reason."""
        if self.job.cancel_requested:
            self.cancel.set()
        watcher = asyncio.ensure_future(self._watch_cancel())
        remote = self._remote_classifier()
        try:
            self._announce(resumed)
            info = await self._or_cancel(remote.wait_ready())
            self.log.line("✓ API is healthy and ready")
            self.log.line("Model: %s v%s (min confidence %.2f)", info.name, info.version, info.min_confidence)
            if self.job.min_confidence is None:
                await _io(self.store.set_min_confidence, self.job.job_id, info.min_confidence)
            await _io(self.store.set_state, self.job.job_id, JobState.RUNNING)
            self._set_phase("running")
            self._job_changed(await _io(self.store.get, self.job.job_id))
            if not self.job.scanned:
                await self._scan()
            else:
                await _io(self.store.take_over, self.job.job_id)  # a crashed run's transfers are this run's now
                await _io(self.filing.recover_all)
                rows = await _io(self.store.files, self.job.job_id)
                await _io(reports.write_csv, self.files.csv, reports.csv_rows(rows, self.job.input_dir),
                          self.settings.batch_csv_escape_formulas)
            await self._process(remote)
            if self.filing.recovery_failures:
                return JobState.FAILED, self.filing.recovery_error()
            return JobState.SUCCEEDED, ""
        except _Cancelled:
            return JobState.CANCELLED, "cancelled on request"
        except InferenceRefused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                return JobState.FAILED, token_refused(self.settings, "the Inference service", exc.details)
            return JobState.FAILED, f"the Inference service refused the job: {exc}"
        except (_InputMissing, _OutOfSpace) as exc:
            return JobState.FAILED, str(exc)
        except StoreUnavailable:
            raise  # not the job's failure: it stops where it is and resumes later
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
        self._job_changed(await _io(self.store.add_files, self.job.job_id, images, skipped))
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
        exclude = {self.job.output_dir}
        if self.store.folder is not None:
            store_folder = Path(os.path.realpath(self.store.folder))
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
        self._settle_helpers()
        self.filing.recover_all()  # transfers left recorded as moving when the job stopped early
        if self.filing.recovery_failures and state != JobState.FAILED:
            state, error = JobState.FAILED, joined_reasons(error, self.filing.recovery_error())
        self.store.release_pending(job_id, now)
        job = dataclasses.replace(self.store.get(job_id), state=state, error=error, finished_at=now)
        try:
            self._write_reports(job)
        except OSError as exc:
            log.error("Job %s: could not write its results: %s", job_id, exc)
            state, error = JobState.FAILED, joined_reasons(error, f"could not write the job's results: {exc}")
            self.store.set_ending(job_id, state, error)
            job = dataclasses.replace(job, state=state, error=error)
            with contextlib.suppress(OSError):
                self._write_reports(job)  # the summary may still fit where the CSV did not
        failpoints.reached("finishing")
        job = self.store.finish(job_id, state, error, now)
        self.log.finished(job, self.files)
        metrics.BATCH_JOBS.labels(state.value).inc()
        metrics.BATCH_JOB_DURATION.observe(job.duration_s())
        if state != JobState.CANCELLED:  # a cancelled job is no run (JobStore.last_finished)
            metrics.BATCH_LAST_RUN.set(now)
        log.info("Job %s %s: %d processed (%d successful, %d uncertain, %d failed), %d skipped in %.1fs%s",
                 job_id, state.name, job.counts.processed, job.counts.successful, job.counts.uncertain,
                 job.counts.failed, job.skipped, job.duration_s(), f": {error}" if error else "")
        return job

    def _settle_helpers(self) -> None:
        """Once the end state is recorded nobody plans more of the job's files: wait until no other worker
        is transferring any (those of workers that died are taken over and finished here)."""
        job_id, note_at = self.job.job_id, time.monotonic()
        while True:
            if self.store.take_over(job_id):
                self.filing.recover_all()
            elif not self.store.moving_elsewhere(job_id):
                return
            else:
                if time.monotonic() >= note_at:
                    log.info("Job %s: waiting for other workers to finish moving its files", job_id)
                    note_at = time.monotonic() + 30
                time.sleep(HELPERS_POLL_S)

    def _write_reports(self, job: JobRecord) -> None:
        job_id = job.job_id
        reports.write_csv(self.files.csv, reports.csv_rows(self.store.files(job_id), job.input_dir),
                          self.settings.batch_csv_escape_formulas)
        content = reports.summary(job, self.files, self.store.files(job_id, (Outcome.FAILED,)),
                                  self.store.files(job_id, (Outcome.SKIPPED,)), self.root.root)
        reports.write_summary(self.files.summary, content)

    # --- the pipeline ----------------------------------------------------------------------------

    async def _process(self, remote: RemoteClassifier) -> None:
        """Claim and sort the job's files until none is left to claim. The job's runner then goes on until
        every file of the job is done: it takes over the files of helpers that died (finishing their
        transfers from their records, sorting the rest) and waits for the live ones."""
        job_id = self.job.job_id
        while True:
            await self._sort_claims(remote)
            if not self.leader:
                return
            await _io(self.store.release_claims, job_id)  # none normally: all were sorted
            if await _io(self.store.take_over, job_id):
                await _shielded_io(self.filing.recover_all)
            elif not await _io(self.store.unfinished_files, job_id):
                return
            else:
                await self._or_cancel(asyncio.sleep(HELPERS_POLL_S))

    async def _sort_claims(self, remote: RemoteClassifier) -> None:
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
                group = [(item.rows, item.data, await self._verdicts(item))]
                size = len(item.rows)
                while size < SORT_GROUP_MAX and not in_flight.empty():
                    more = in_flight.get_nowait()
                    if not isinstance(more, _Chunk) or (more.verdicts is not None and not more.verdicts.done()):
                        taken.append(more)
                        break
                    group.append((more.rows, more.data, await self._verdicts(more)))
                    size += len(more.rows)
                job, updates = await _shielded_io(self.filing.sort, group)
                if updates:
                    self._publish(job, files=tuple(updates))
                if self.filing.out_of_space:
                    raise _OutOfSpace(self.filing.out_of_space)
        finally:
            producer.cancel()
            for pending in [*taken, *(in_flight.get_nowait() for _ in range(in_flight.qsize()))]:
                if isinstance(pending, _Chunk) and pending.verdicts is not None:
                    pending.verdicts.cancel()

    async def _verdicts(self, chunk: _Chunk) -> list[ImageAnswer]:
        return await self._or_cancel(chunk.verdicts) if chunk.verdicts is not None else []

    async def _send_chunks(self, remote: RemoteClassifier, out: asyncio.Queue[_Chunk | BaseException | None]) -> None:
        try:
            # A chunk's worth at a time: what one worker holds and has not sorted yet stays small, so that
            # workers sharing a job (replicas) split it evenly.
            while rows := await _io(self.store.claim_files, self.job.job_id, self.settings.batch_chunk_size):
                chunks = self.filing.read(rows)  # read lazily, off the event loop: a chunk once the last is queued
                while chunk := await _io(next, chunks, None):
                    group, data = chunk
                    images = [d for d in data if isinstance(d, bytes)]
                    verdicts = asyncio.ensure_future(remote.classify(images)) if images else None
                    await out.put(_Chunk(group, data, verdicts))
            await out.put(None)
        except Exception as exc:
            await out.put(exc)

    # --- state changes ---------------------------------------------------------------------------

    def _publish(self, job: JobRecord | None, files: tuple[FileUpdate, ...] = (), message: str = "") -> None:
        if job is not None and self.runner.events.watched(job.job_id):
            self.runner.events.publish(JobUpdate(job, files, message))

    def _inference_down(self, reason: str, delay: float) -> None:
        address = self.settings.inference_address
        error = f"waiting for the Inference service at {address}: {reason}; next attempt in {delay:.0f}s"
        if not self.leader:  # the job's state is its runner's
            self.log.line("✗ API not available (%s): retrying in %.0f seconds", reason, delay)
            return
        self.store.set_state(self.job.job_id, JobState.WAITING, error)
        self._set_phase("waiting")
        metrics.BATCH_INFERENCE_WAITS.inc()
        self.log.line("✗ API not available (%s): retrying in %.0f seconds", reason, delay)
        log.warning("Job %s %s", self.job.job_id, error)
        self._publish(self.store.get(self.job.job_id), message=error)

    def _inference_back(self) -> None:
        if not self.leader:
            self.log.line("✓ API is healthy and ready")
            return
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
        """A cancel requested from another process (only the database is shared) reaches the job too; a
        helper also stops once the job's runner recorded its end."""
        while not self.cancel.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            if await _io(self.store.cancel_requested if self.leader else self.store.closing, self.job.job_id):
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


async def _io(fn: Callable[..., T], *args: object) -> T:
    """Blocking work (the jobs database, the filesystem) off the event loop."""
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

"""The Batch service's data plane: validates submissions, queues jobs and runs them.

Transport-free: the gRPC servicer is a thin adapter over JobQueue. Jobs run oldest first, up to
batch_max_concurrent_jobs at a time. At start, and every batch_poll_interval_s after, every
unfinished job in the database is (re)queued: jobs interrupted by a crash of this service, jobs
of a `fashion batch run` process that died (its lock is gone), and (PostgreSQL) jobs submitted
through another replica. A job whose lock another live process holds is skipped and offered again
at the next round; on a store that replicas share, a worker with nothing else queued helps with
it instead (JobRunner.assist): the replicas split a big job's files. A helper goes back to the queue
as soon as a job that nobody runs (its lock is free) waits for a worker here: one submitted here, or
one the round finds (queued on a busy replica, or its runner died); jobs other live processes run
never interrupt it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from fashion.client.text import printable
from services.batch.paths import DataRoot, PathRefused, shown
from services.batch.records import JobRecord, JobSpec, JobState
from services.batch.reports import prune_run_files
from services.batch.runner import JobBusy, JobRunner
from services.batch.stats import BatchHistory, batch_history
from services.batch.store import JobStore, StoreUnavailable

log = logging.getLogger(__name__)
PRUNE_INTERVAL_S = 30.0  # per-file records older than FASHION_BATCH_HISTORY_DAYS
FILE_SWEEP_INTERVAL_S = 3600.0  # per-run files older than FASHION_RETENTION_DAYS
CANCEL_WAIT_S = 10.0
MAX_IDEMPOTENCY_KEY = 256


def job_spec(root: DataRoot, store_dir: Path | None, input_dir: str, output_dir: str = "", mode: str = "move",
             min_confidence: float | None = None, recursive: bool = False, idempotency_key: str = "") -> JobSpec:
    """A checked job request, folders relative to the data root.

    Raises PathRefused (bad or escaping path, bad option, an idempotency key over MAX_IDEMPOTENCY_KEY
    characters) or FolderMissing (input folder absent).
    """
    if min_confidence is not None and not (math.isfinite(min_confidence) and 0.0 <= min_confidence <= 1.0):
        raise PathRefused(f"min_confidence must be between 0 and 1, got {min_confidence}")
    if mode not in ("move", "copy"):
        raise PathRefused(f"mode must be move or copy, got {mode!r}")
    key = idempotency_key.strip()
    if len(key) > MAX_IDEMPOTENCY_KEY:  # a unique index holds it (PostgreSQL's b-tree: about 2.7 KB at most)
        raise PathRefused(f"idempotency_key has {len(key)} characters: at most {MAX_IDEMPOTENCY_KEY}")
    if "\x00" in key:
        raise PathRefused("idempotency_key contains a NUL byte")
    source = root.folder(input_dir, "input_dir")
    target = root.resolve(output_dir, "output_dir")
    if store_dir is not None:  # the SQLite file's folder
        store_real = Path(store_dir).resolve()
        for what, path in (("input_dir", source), ("output_dir", target)):
            if path.is_relative_to(store_real):
                raise PathRefused(f"{what} lies in {store_real}, the jobs database folder")
    if root.not_a_folder(target, output_dir, "output_dir"):
        raise PathRefused(f"output_dir {shown(output_dir)} exists and is not a folder")
    if source == target:
        raise PathRefused(f"input_dir and output_dir are the same folder ({source}): sorted images would be "
                          "sorted again")
    return JobSpec(root.relative(source), root.relative(target), mode, min_confidence, recursive, key)


class JobQueue:
    """Submits, lists, cancels and runs the jobs of one Batch service."""

    def __init__(self, runner: JobRunner, max_concurrent: int = 1, history_days: int = 90) -> None:
        self.runner = runner
        self.store: JobStore = runner.store
        self.settings = runner.settings
        self.root = runner.root
        self._max_concurrent = max_concurrent
        self._history_days = history_days
        self._next_file_sweep = 0.0
        self._next_prune = 0.0
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._running: dict[str, asyncio.Event] = {}
        self._assisting: dict[str, asyncio.Event] = {}
        """The jobs this service's workers help with (a subset of _running), and the events that stop them."""
        self._tasks: list[asyncio.Task[None]] = []

    def spec(self, input_dir: str, output_dir: str = "", mode: str = "", min_confidence: float | None = None,
             recursive: bool = False, idempotency_key: str = "") -> JobSpec:
        return job_spec(self.root, self.store.folder, input_dir, output_dir or self.settings.batch_output_dir,
                        mode or self.settings.batch_mode,
                        min_confidence if min_confidence is not None else self.settings.batch_min_confidence,
                        recursive, idempotency_key)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._work()) for _ in range(self._max_concurrent)]
        self._tasks.append(asyncio.ensure_future(self._adopt_forever()))

    async def stop(self) -> None:
        """Stop the running jobs where they are (they resume at the next start)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.close()

    # --- operations ------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, trigger: str = "api") -> JobRecord:
        job = await asyncio.to_thread(self.store.create, spec, trigger)
        if job.state == JobState.QUEUED:
            self._enqueue(job.job_id)
            try:
                await self._yield_to_unrun([job.job_id])
            except StoreUnavailable as exc:  # the job is recorded: the next round looks again
                log.warning("Job %s: could not tell whether it waits for a worker: %s", job.job_id, exc)
        log.info("Job %s submitted (%s): %s -> %s, %s", job.job_id, trigger, printable(job.input_dir),
                 printable(job.output_dir), job.mode)
        return job

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        return self.store.list(limit, state)

    def health_inputs(self, days: int = 7) -> tuple[BatchHistory, JobRecord | None]:
        """What batch health is judged from: the window's statistics and the last failed job."""
        failed = self.store.list(1, JobState.FAILED)
        return self.history(days), (failed[0] if failed else None)

    def history(self, days: int = 7) -> BatchHistory:
        """The statistics of the last `days` days, and the free space where the images are."""
        history = batch_history(self.store, days)
        try:
            usage = shutil.disk_usage(self.root.real)
        except OSError as exc:
            log.warning("Cannot read the disk usage of the data root %s: %s", self.root.root, exc)
            return history
        return dataclasses.replace(history, data_root=str(self.root.root), data_total_bytes=usage.total,
                                   data_free_bytes=usage.free)

    async def cancel(self, job_id: str) -> JobRecord:
        """Request the cancellation and wait (a little) for the job to stop. Raises JobFinished."""
        job = await asyncio.to_thread(self.store.request_cancel, job_id)
        event = self._running.get(job.job_id)
        if event is not None:
            event.set()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not job.state.finished and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            job = await asyncio.to_thread(self.store.get, job.job_id)
        log.info("Job %s: cancellation requested (now %s)", job.job_id, job.state.name)
        return job

    # --- workers ---------------------------------------------------------------------------------

    def _enqueue(self, job_id: str) -> None:
        if job_id not in self._queued and job_id not in self._running:
            self._queued.add(job_id)
            self._queue.put_nowait(job_id)

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            self._queued.discard(job_id)
            if job_id in self._running:
                continue
            event = self._running[job_id] = asyncio.Event()
            try:
                await self.runner.run(job_id, event)
            except JobBusy:
                log.debug("Job %s is run by another process; offered again later", job_id)
                if self.store.shared and self._queue.empty():
                    await self._assist(job_id, event)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("Job %s stopped: %s", job_id, exc)
            except Exception:
                log.exception("Job %s could not be run", job_id)
            finally:
                del self._running[job_id]

    async def _assist(self, job_id: str, event: asyncio.Event) -> None:
        """Nothing of its own queued here: help with a job another replica runs, until `event` (set by
        _yield_to_unrun when a job nobody runs waits here, or by a cancellation)."""
        self._assisting[job_id] = event
        try:
            sorted_here = await self.runner.assist(job_id, event)
        except StoreUnavailable as exc:
            log.warning("Stopped helping with job %s: %s", job_id, exc)
            return
        except Exception:  # in an except clause of _work: nothing else would catch it
            log.exception("Could not help with job %s", job_id)
            return
        finally:
            del self._assisting[job_id]
        if sorted_here:
            log.info("Job %s: sorted %d of its images for the replica that runs it", job_id, sorted_here)

    async def _yield_to_unrun(self, job_ids: Sequence[str]) -> None:
        """Helpers make room for the jobs among `job_ids` that wait for a worker here and that nobody runs (their
        lock is free): free workers take them, and for each of the others one helper stops helping (it finishes
        or hands back what it holds) and goes back to the queue. A helped job whose runner died is left by its
        helper (the next round runs it here). Jobs other live processes run stop no helper: no flipping."""
        if all(event.is_set() for event in self._assisting.values()):
            return
        candidates = [job_id for job_id in job_ids if job_id not in self._running or job_id in self._assisting]
        if not candidates:
            return
        unrun = await asyncio.to_thread(self.store.runnable, candidates)
        for job_id in unrun & self._assisting.keys():
            if not self._assisting[job_id].is_set():
                log.info("Stopping helping with job %s: nobody runs it any more, so it is run here", job_id)
                self._assisting[job_id].set()
        waiting = [job_id for job_id in candidates if job_id in unrun and job_id not in self._running]
        free = self._max_concurrent - len(self._running)
        helping = [(job_id, event) for job_id, event in self._assisting.items() if not event.is_set()]
        for (helped, event), job_id in zip(helping, waiting[max(free, 0):], strict=False):
            log.info("Stopping helping with job %s to run job %s, which waits here and nobody runs", helped, job_id)
            event.set()

    async def _adopt_forever(self) -> None:
        while True:
            try:
                unfinished = await asyncio.to_thread(self.store.unfinished_ids)
                for job_id in unfinished:
                    self._enqueue(job_id)
                await self._yield_to_unrun(unfinished)
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                    pruned = await asyncio.to_thread(self.store.prune, time.time() - self._history_days * 86400)
                    if pruned:
                        log.info("Deleted %d per-file records older than %d days", pruned, self._history_days)
                if time.monotonic() >= self._next_file_sweep:
                    self._next_file_sweep = time.monotonic() + FILE_SWEEP_INTERVAL_S
                    await asyncio.to_thread(prune_run_files, self.settings, self.settings.results_dir)
            except StoreUnavailable as exc:
                log.warning("Could not look for unfinished jobs: %s", exc)
            except Exception:
                log.exception("Could not look for unfinished jobs")
            await asyncio.sleep(self.settings.batch_poll_interval_s)

"""A folder run as a job in this process, without a Batch server (`fashion batch run`, for cron and
Kubernetes CronJobs), and the batch health read straight from the jobs database.

The job is the Batch service's own: the same store (SQLite or PostgreSQL), lock, runner and
reports; the service and these runs share the database, and a lock keeps a job from being run twice.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable

from fashion.v1 import batch_pb2 as pb
from services.batch import converters, failpoints, health
from services.batch.events import JobEvents
from services.batch.jobs import job_spec
from services.batch.paths import FolderMissing, PathRefused, check_log_dir_outside
from services.batch.records import JobRecord, JobState
from services.batch.reports import RunnerLog
from services.batch.runner import JobRunner
from services.batch.sharding import Shard
from services.batch.stats import batch_history
from services.batch.store import JobLock, StoreUnavailable, default_db_path, new_job_id, open_job_store
from services.common.config import BatchSettings, load_settings

JobUpdate = Callable[[pb.Job, pb.JobEvent | None], None]
"""Called with the job's latest snapshot and, after the first call, the event that moved it."""


def run_folder(folder: str, output: str = "", copy: bool = False, min_confidence: float | None = None,
               recursive: bool = False, inference_address: str | None = None, shard_count: int | None = None,
               shard_index: int | None = None, on_start: Callable[[str, bool], None] = lambda job_id, resumed: None,
               on_update: JobUpdate = lambda job, event: None,
               on_resumed: Callable[[pb.Job], None] = lambda job: None, max_wait_s: float | None = None) -> pb.Job:
    """Resume this folder's interrupted runs, then run it as a new job; returns the new job as it ended.

    `on_start(job_id, resumed)` announces each job before it runs, `on_update` follows it, `on_resumed` gets
    each resumed job as it ended. `max_wait_s` overrides FASHION_BATCH_RUN_MAX_WAIT_S. Raises
    ValueError, with the reason, when the folders or options are refused or the jobs database cannot be
    used; unusable FASHION_* values end the process with exit code 2 (config.load_settings).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    overrides: dict[str, object] = {"inference_address": inference_address} if inference_address else {}
    if shard_count is not None:
        overrides["batch_shard_count"] = shard_count
    if shard_index is not None:
        overrides["batch_shard_index"] = shard_index
    if max_wait_s is not None:
        overrides["batch_run_max_wait_s"] = max_wait_s
    settings = load_settings(BatchSettings, **overrides)
    Shard.resolve(settings.batch_shard_index, settings.batch_shard_count)  # ValueError names the problem
    check_log_dir_outside(settings.data_root, settings.log_dir)
    ended: list[pb.Job] = []
    try:
        return asyncio.run(_run_folder(settings, folder, output, copy, min_confidence, recursive, on_start,
                                       on_update, on_resumed, ended))
    except StoreUnavailable as exc:  # the job resumes when the same command runs again
        raise ValueError(str(exc)) from None
    except KeyboardInterrupt:
        if ended:  # Ctrl-C while closing: the job had ended, and its outcome is what the command reports
            return ended[0]
        raise


async def _run_folder(settings: BatchSettings, folder: str, output: str, copy: bool, min_confidence: float | None,
                      recursive: bool, on_start: Callable[[str, bool], None], on_update: JobUpdate,
                      on_resumed: Callable[[pb.Job], None], ended: list[pb.Job]) -> pb.Job:
    try:
        store = open_job_store(settings)
    except (ValueError, StoreUnavailable) as exc:
        raise ValueError(str(exc)) from None
    runner = JobRunner(settings, store, JobEvents())
    runner_log = RunnerLog(settings)
    job_id = ""
    try:
        runner_log.started(trigger="fashion batch run")
        try:
            spec = job_spec(runner.root, store.folder, folder, output or settings.batch_output_dir,
                            "copy" if copy else settings.batch_mode,
                            min_confidence if min_confidence is not None else settings.batch_min_confidence,
                            recursive)
        except (PathRefused, FolderMissing) as exc:
            runner_log.line("✗ Cannot process the folder: %s", str(exc))
            raise ValueError(str(exc)) from None
        runner_log.line("Input: %s%s", runner.root.display(spec.input_dir), " (recursive)" if recursive else "")
        runner_log.line("Output: %s", runner.root.display(spec.output_dir))
        for old in store.unfinished():
            if old.trigger == "cli" and old.input_dir == spec.input_dir:
                lock = store.lock_job(old.job_id)
                if lock is not None:
                    job_id = old.job_id
                    runner_log.line("Resuming interrupted batch job %s", job_id)
                    on_start(job_id, True)
                    record = await _run_job(runner, job_id, lock, on_update)
                    runner_log.outcome(record)
                    on_resumed(converters.job_to_pb(record, settings))
        job_id = new_job_id()
        lock = store.lock_job(job_id)  # before the job exists: no service adopts it
        assert lock is not None
        store.create(spec, "cli", job_id=job_id)
        runner_log.line("Started batch job %s", job_id)
        on_start(job_id, False)
        record = await _run_job(runner, job_id, lock, on_update)
        runner_log.outcome(record)
        job_id = ""
        ended.append(converters.job_to_pb(record, settings))
        failpoints.reached("ended")
        return ended[0]
    except (asyncio.CancelledError, KeyboardInterrupt):
        if job_id:
            runner_log.line("Batch runner interrupted: job %s resumes when the same command runs again", job_id)
        raise
    except StoreUnavailable as exc:
        if not job_id:
            raise
        runner_log.line("✗ Batch runner stopped: %s; job %s resumes when the same command runs again", str(exc), job_id)
        raise StoreUnavailable(f"{exc}; job {job_id} resumes when the same command runs again") from None
    finally:
        runner_log.close()
        await runner.close()
        store.close()


WAIT_CHECK_S = 1.0
"""How often a job run by `fashion batch run` is looked at while nothing happens (is it waiting too long?)."""


class InferenceGone(StoreUnavailable):
    """The Inference service did not answer within batch_run_max_wait_s: the job stops where it is and resumes
    at the next run, as when the jobs database cannot be used."""


async def _run_job(runner: JobRunner, job_id: str, lock: JobLock, on_update: JobUpdate) -> JobRecord:
    """Run the job, following it; raises InferenceGone once it has waited batch_run_max_wait_s for the
    Inference service (the job stops where it is, as on Ctrl-C)."""
    updates = runner.events.subscribe(job_id)
    task = asyncio.ensure_future(runner.run(job_id, lock=lock))
    max_wait_s = runner.settings.batch_run_max_wait_s
    waiting_since: float | None = None
    next_look = time.monotonic() + WAIT_CHECK_S
    try:
        on_update(converters.job_to_pb(runner.store.get(job_id), runner.settings), None)
        while not task.done():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({task, getter}, timeout=WAIT_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
            if max_wait_s > 0 and not task.done() and time.monotonic() >= next_look:  # once a second at most
                next_look = time.monotonic() + WAIT_CHECK_S
                job = await asyncio.to_thread(runner.store.get, job_id)
                if job.state != JobState.WAITING:
                    waiting_since = None
                elif waiting_since is None:
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since >= max_wait_s:
                    getter.cancel()
                    raise InferenceGone(f"the Inference service at {runner.settings.inference_address} has not "
                                        f"answered for {max_wait_s:g} s (FASHION_BATCH_RUN_MAX_WAIT_S): {job.error}")
            if not getter.done():
                getter.cancel()
                continue
            # Everything queued at once; only failures and the latest snapshot are worth converting.
            batch = [getter.result(), *(updates.get_nowait() for _ in range(updates.qsize()))]
            failed = [converters.file_to_pb(f) for update in batch for f in update.files if f.status == "failed"]
            latest = batch[-1]
            on_update(converters.job_to_pb(latest.job, runner.settings),
                      pb.JobEvent(message=latest.message, files=failed))
        return await task
    finally:
        runner.events.unsubscribe(job_id, updates)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def batch_health(days: int, max_age_hours: float | None = None) -> pb.BatchHealth:
    """The batch health check read straight from the jobs database under the data root (no Batch service
    needed), judged as the Batch service judges it."""
    settings = load_settings(BatchSettings)
    try:
        sqlite = not settings.batch_database_url_value()
        if sqlite and not default_db_path(settings).exists():
            return health.judge(pb.BatchStats(days=days, success_rate=100.0), None, settings, max_age_hours)
        store = open_job_store(settings)
    except (ValueError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        failed = store.list(1, JobState.FAILED)
        return health.judge(converters.history_to_pb(batch_history(store, days)),
                            converters.job_to_pb(failed[0], settings) if failed else None, settings, max_age_hours)
    finally:
        store.close()

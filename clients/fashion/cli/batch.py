"""`fashion batch submit|status|list|watch|cancel|run|health`: batch jobs, through the Batch service
or embedded (`run`: the same job in this process, no Batch server; for cron users).

DIR is a folder under the data root: relative to it ("inbox"), or a path on this machine inside
it ("data/inbox", absolute paths); a path that leaves the data root is refused.

Exit codes: 0 success; 1 the job failed or was cancelled, or (health) batch processing is
unhealthy; 2 bad arguments or the service could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from fashion.client.batch import BatchClient, state_name
from fashion.v1 import batch_pb2 as pb

if TYPE_CHECKING:  # the services are imported only by the commands that run them locally
    from services.batch.runner import JobLock, JobRunner
    from services.common.config import BatchSettings

RULE = "=" * 60
ERROR_WINDOW_H = 24.0
EXIT_OK, EXIT_UNHEALTHY, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def register(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="batch jobs: sort folders of images into category folders")
    bsub = batch.add_subparsers(dest="batch_command", required=True, metavar="COMMAND")

    p = bsub.add_parser("submit", help="start a job on the Batch service")
    p.add_argument("dir", metavar="DIR", help="folder to process, under the data root")
    _job_options(p)
    p.add_argument("--key", default="", help="idempotency key: submitting twice returns the first job")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends, then a summary")
    _output_options(p)
    p.set_defaults(func=submit)

    p = bsub.add_parser("run", help="run a job in this process, without a Batch server (for cron)")
    p.add_argument("dir", metavar="DIR", help="folder to process, under the data root")
    _job_options(p)
    p.add_argument("--inference-address", default=None, help="Inference service host:port "
                                                             "(FASHION_INFERENCE_ADDRESS)")
    p.add_argument("--json", action="store_true", help="print the final job as JSON instead of a table")
    p.add_argument("--shard-count", type=int, default=None, metavar="N",
                   help="scale-out: split the images into N shards by a stable hash of their path "
                        "(FASHION_BATCH_SHARD_COUNT)")
    p.add_argument("--shard-index", type=int, default=None, metavar="I",
                   help="the shard this process sorts, 0..N-1 (default: JOB_COMPLETION_INDEX of a Kubernetes "
                        "Indexed Job, else 0)")
    p.set_defaults(func=run_embedded)

    p = bsub.add_parser("status", help="one job's state and counts")
    p.add_argument("job_id", metavar="JOB")
    _output_options(p)
    p.set_defaults(func=status)

    p = bsub.add_parser("list", help="recent jobs, most recent first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--state", choices=[state_name(v).lower() for v in pb.JobState.values() if v], default=None)
    _output_options(p)
    p.set_defaults(func=list_jobs)

    p = bsub.add_parser("watch", help="follow a job's progress until it ends")
    p.add_argument("job_id", metavar="JOB")
    _address(p)
    p.set_defaults(func=watch)

    p = bsub.add_parser("cancel", help="stop a queued or running job (sorted files stay sorted)")
    p.add_argument("job_id", metavar="JOB")
    _output_options(p)
    p.set_defaults(func=cancel)

    p = bsub.add_parser("health", help="batch processing health check (exit 1 when unhealthy)")
    p.add_argument("--days", type=int, default=7, help="statistics window in days (default 7)")
    p.add_argument("--max-age-hours", type=float, default=None,
                   help="a last run older than this is unhealthy (FASHION_BATCH_STALE_HOURS, default 26)")
    p.add_argument("--local", action="store_true",
                   help="read the jobs database under FASHION_DATA_ROOT directly instead of asking the service")
    _output_options(p)
    p.set_defaults(func=health)


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--copy", action="store_true", help="copy images instead of moving them")
    p.add_argument("--recursive", "-r", action="store_true", help="also process subfolders")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="below it images go to _uncertain/ (default: the model's)")
    p.add_argument("--output", default="", help="folder of the category folders, under the data root "
                                                "(default processed_batches)")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _address(p)


def _address(p: argparse.ArgumentParser) -> None:
    from services.common.config import raw_setting

    p.add_argument("--address", default=raw_setting("batch_address"),
                   help="Batch service host:port (FASHION_BATCH_ADDRESS)")


def _folder_arg(raw: str) -> str:
    """A folder as the server understands it: relative to the data root when it is a local path inside
    it, else as typed (the server resolves it against its own data root)."""
    from services.common.config import BatchSettings

    if not raw or not os.path.exists(raw):
        return raw
    root = Path(os.path.realpath(BatchSettings().data_root))
    real = Path(os.path.realpath(raw))
    if not real.is_relative_to(root):
        return raw  # the server refuses it with the reason
    return real.relative_to(root).as_posix()


def _rpc_error(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return EXIT_ERROR


def _as_json(msg: object) -> str:
    return json.dumps(MessageToDict(msg, preserving_proto_field_name=True,  # type: ignore[arg-type]
                                    always_print_fields_with_no_presence=True), indent=2, ensure_ascii=False)


# --- submit / watch ----------------------------------------------------------------------------


def submit(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            job = client.submit(_folder_arg(args.dir), "copy" if args.copy else "", args.min_confidence,
                                args.recursive, _folder_arg(args.output), args.key)
            if not args.wait:
                if args.json:
                    print(_as_json(job))
                else:
                    print(f"Job {job.job_id} {state_name(job.state)}: {job.input_dir} -> {job.output_dir}")
                    print(f"Follow it with: fashion batch watch {job.job_id}")
                return EXIT_OK
            return _follow(client, job, args.json)
    except grpc.RpcError as exc:
        return _rpc_error(exc)


def watch(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            return _follow(client, client.get(args.job_id), False)
    except grpc.RpcError as exc:
        return _rpc_error(exc)


def _follow(client: BatchClient, job: pb.Job, as_json: bool) -> int:
    console = Console(stderr=as_json)
    display = JobProgress(console)
    try:
        with display:
            display.update(job)
            for event in client.watch(job.job_id):  # ends after the job's last event
                job = event.job
                display.update(job, event)
    except KeyboardInterrupt:
        console.print(f"Stopped watching; job {job.job_id} goes on. Follow it with: fashion batch watch "
                      f"{job.job_id}, stop it with: fashion batch cancel {job.job_id}")
        return EXIT_INTERRUPTED
    if as_json:
        print(_as_json(job))
    else:
        print_summary(console, job, display.failures)
    return EXIT_OK if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_UNHEALTHY


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s", style="progress.data.speed")


class JobProgress:
    """A progress bar of one job (processed of total, rate, ETA) fed with its events."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.failures: list[pb.FileResult] = []
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            RateColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
            console=console, transient=False)
        self._task = self._progress.add_task("queued", total=None)
        self._last_message = ""

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, job: pb.Job, event: pb.JobEvent | None = None) -> None:
        description = f"{job.job_id[:8]} {state_name(job.state).lower()}"
        self._progress.update(self._task, description=description, total=job.total or None,
                              completed=job.processed)
        if event is not None:
            self.failures.extend(f for f in event.files if f.status == "failed")
        message = event.message if event is not None else ""
        if job.state == pb.JOB_STATE_WAITING and message and message != self._last_message:
            self._progress.console.print(f"[yellow]{message}[/yellow]")
        self._last_message = message


def print_summary(console: Console, job: pb.Job, failures: Iterable[pb.FileResult] = ()) -> None:
    state = state_name(job.state)
    color = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow"}.get(state, "white")
    table = Table(title=f"Batch job {job.job_id}: [{color}]{state}[/{color}]", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rate = job.processed / job.duration_seconds if job.duration_seconds else 0.0
    rows = [
        ("Input", f"{job.input_dir} ({'copy' if job.mode == pb.TRANSFER_MODE_COPY else 'move'}"
                  f"{', recursive' if job.recursive else ''})"),
        ("Output", job.output_dir),
        ("Images found", f"{job.total:,}"),
        ("Processed", f"{job.processed:,}"),
        ("Successful", f"{job.successful:,}"),
        ("Uncertain", f"{job.uncertain:,} (below {100 * job.min_confidence:.0f}%, in _uncertain/)"),
        ("Failed", f"{job.failed:,} (in _failed/ or left in place)"),
        ("Skipped", f"{job.skipped:,} (not images, left in place)"),
        ("Duration", f"{job.duration_seconds:.1f} s ({rate:.1f} images/s)"),
    ]
    if job.error:
        rows.append(("Error", job.error))
    rows += [("Results CSV", job.results_csv), ("Summary JSON", job.summary_json), ("Log", job.log_file)]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if job.categories:
        categories = Table("category", "images", title="Categories")
        for name, n in sorted(job.categories.items(), key=lambda kv: (-kv[1], kv[0])):
            categories.add_row(name, f"{n:,}")
        console.print(categories)
    failures = list(failures)
    if failures:
        errors = Table("file", "error", title="Failed files")
        for f in failures[:20]:
            errors.add_row(f.filename, f.error)
        if len(failures) > 20:
            errors.add_row(f"... and {len(failures) - 20} more", "see the summary JSON")
        console.print(errors)


# --- status / list / cancel --------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            job = client.get(args.job_id)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    if args.json:
        print(_as_json(job))
    else:
        print_summary(Console(), job)
    return EXIT_OK


def list_jobs(args: argparse.Namespace) -> int:
    state = pb.JobState.Value(f"JOB_STATE_{args.state.upper()}") if args.state else pb.JOB_STATE_UNSPECIFIED
    try:
        with BatchClient(args.address) as client:
            jobs = client.list(args.limit, state)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    if args.json:
        print(json.dumps([json.loads(_as_json(j)) for j in jobs], indent=2, ensure_ascii=False))
        return EXIT_OK
    table = Table("job", "state", "trigger", "input", "created", "processed", "successful", "uncertain", "failed",
                  "duration")
    for j in jobs:
        created = datetime.fromtimestamp(j.created_at.seconds).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(j.job_id, state_name(j.state), j.trigger, j.input_dir, created, f"{j.processed}/{j.total}",
                      str(j.successful), str(j.uncertain), str(j.failed), f"{j.duration_seconds:.1f}s")
    Console().print(table)
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            job = client.cancel(args.job_id)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    if args.json:
        print(_as_json(job))
    else:
        print(f"Job {job.job_id}: {state_name(job.state)} ({job.processed} of {job.total} images processed; "
              "the rest stay where they are)")
    return EXIT_OK


# --- embedded run ------------------------------------------------------------------------------


class _Refused(Exception):
    pass


def run_embedded(args: argparse.Namespace) -> int:
    from services.batch.sharding import Shard
    from services.common.config import BatchSettings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    overrides: dict[str, object] = {"inference_address": args.inference_address} if args.inference_address else {}
    if args.shard_count is not None:
        overrides["batch_shard_count"] = args.shard_count
    if args.shard_index is not None:
        overrides["batch_shard_index"] = args.shard_index
    settings = BatchSettings(**overrides)  # an unusable FASHION_* value: reported by fashion.cli.main, exit 2
    try:
        Shard.resolve(settings.batch_shard_index, settings.batch_shard_count)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    console = Console(stderr=args.json)
    try:
        job = asyncio.run(_embedded(settings, args, console))
    except KeyboardInterrupt:
        console.print("Interrupted: run the same command again to resume the job where it stopped")
        return EXIT_INTERRUPTED
    except _Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_UNHEALTHY


async def _embedded(settings: BatchSettings, args: argparse.Namespace, console: Console) -> pb.Job:
    """Resume this folder's interrupted embedded jobs, then run a new one, each with a progress bar."""
    from services.batch.events import JobEvents
    from services.batch.jobs import job_spec
    from services.batch.paths import FolderMissing, PathRefused
    from services.batch.runner import JobLock, JobRunner, default_db_path
    from services.batch.store import JobStore, new_job_id

    store = JobStore(default_db_path(settings))
    runner = JobRunner(settings, store, JobEvents())
    try:
        try:
            spec = job_spec(runner.root, store.path.parent, _folder_arg(args.dir),
                            _folder_arg(args.output) or settings.batch_output_dir,
                            "copy" if args.copy else settings.batch_mode,
                            args.min_confidence if args.min_confidence is not None else settings.batch_min_confidence,
                            args.recursive)
        except (PathRefused, FolderMissing) as exc:
            raise _Refused(str(exc)) from None
        for old in store.unfinished():
            if old.trigger == "cli" and old.input_dir == spec.input_dir:
                lock = JobLock.try_acquire(runner.lock_dir, old.job_id)
                if lock is not None:
                    console.print(f"Resuming interrupted job {old.job_id}")
                    await _run_with_progress(runner, old.job_id, lock, console, args.json)
        job_id = new_job_id()
        lock = JobLock.try_acquire(runner.lock_dir, job_id)  # before the job exists: no service adopts it
        assert lock is not None
        store.create(spec, "cli", job_id=job_id)
        return await _run_with_progress(runner, job_id, lock, console, args.json)
    finally:
        await runner.close()
        store.close()


async def _run_with_progress(runner: JobRunner, job_id: str, lock: JobLock, console: Console,
                             as_json: bool) -> pb.Job:
    from services.batch import converters

    updates = runner.events.subscribe(job_id)
    task = asyncio.ensure_future(runner.run(job_id, lock=lock))
    display = JobProgress(console)
    try:
        with display:
            display.update(converters.job_to_pb(runner.store.get(job_id), runner.settings))
            while not task.done():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                # Everything queued at once; only failures and the latest snapshot are worth converting.
                batch = [getter.result(), *(updates.get_nowait() for _ in range(updates.qsize()))]
                for update in batch:
                    display.failures.extend(converters.file_to_pb(f) for f in update.files if f.status == "failed")
                latest = batch[-1]
                display.update(converters.job_to_pb(latest.job, runner.settings),
                               pb.JobEvent(message=latest.message))
        record = await task
    finally:
        runner.events.unsubscribe(job_id, updates)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    job = converters.job_to_pb(record, runner.settings)
    if as_json:
        print(_as_json(job))
    else:
        print_summary(console, job, display.failures)
    return job


# --- health ------------------------------------------------------------------------------------


def health(args: argparse.Namespace) -> int:
    from services.common.config import BatchSettings

    settings = BatchSettings()
    max_age = args.max_age_hours if args.max_age_hours is not None else settings.batch_stale_hours
    try:
        stats, last_failed = _local_health(settings, args.days) if args.local else _remote_health(args)
    except grpc.RpcError as exc:
        print(f"error: the Batch service at {args.address} did not answer: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return EXIT_ERROR
    recent_failure = (last_failed is not None and last_failed.HasField("finished_at")
                      and time.time() - last_failed.finished_at.seconds < ERROR_WINDOW_H * 3600)
    stale = not stats.HasField("last_run_at") or stats.last_run_age_hours >= max_age  # healthy: under max_age
    healthy = not stale and not recent_failure
    if args.json:
        report = json.loads(_as_json(stats))
        report.update(healthy=healthy, stale=stale, max_age_hours=max_age,
                      failed_job=last_failed.job_id if recent_failure and last_failed else None)
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_health(stats, stale, max_age, last_failed if recent_failure else None)
    return EXIT_OK if healthy else EXIT_UNHEALTHY


def _remote_health(args: argparse.Namespace) -> tuple[pb.BatchStats, pb.Job | None]:
    with BatchClient(args.address) as client:
        stats = client.stats(args.days)
        failed = client.list(1, pb.JOB_STATE_FAILED)
    return stats, (failed[0] if failed else None)


def _local_health(settings: BatchSettings, days: int) -> tuple[pb.BatchStats, pb.Job | None]:
    from services.batch import converters
    from services.batch.records import JobState
    from services.batch.runner import default_db_path
    from services.batch.stats import batch_history
    from services.batch.store import JobStore

    path = default_db_path(settings)
    if not path.exists():
        return pb.BatchStats(days=days), None
    store = JobStore(path)
    try:
        failed = store.list(1, JobState.FAILED)
        return (converters.history_to_pb(batch_history(store, days)),
                converters.job_to_pb(failed[0], settings) if failed else None)
    finally:
        store.close()


def _print_health(stats: pb.BatchStats, stale: bool, max_age: float, failed: pb.Job | None) -> None:
    """The monitoring guide's check_batch_health.py report."""
    print(RULE)
    print("BATCH PROCESSING HEALTH CHECK")
    print(RULE)
    print()
    if not stats.HasField("last_run_at"):
        print("Recent Execution: ✗ UNHEALTHY")
        print("  No batch run recorded")
    else:
        print(f"Recent Execution: {'✗ UNHEALTHY' if stale else '✓ HEALTHY'}")
        print(f"  Last run was {stats.last_run_age_hours:.1f} hours ago"
              + (f" (limit {max_age:g} hours)" if stale else ""))
    print()
    if failed is not None:
        print(f"Recent Errors: ✗ Job {failed.job_id} FAILED: {failed.error}")
    elif stats.recent_errors:
        print(f"Recent Errors: ⚠ {len(stats.recent_errors)} errors in the last {ERROR_WINDOW_H:g} hours")
    else:
        print("Recent Errors: ✓ No errors detected")
    for line in stats.recent_errors[:10]:
        print(f"  {line}")
    if len(stats.recent_errors) > 10:
        print(f"  ... and {len(stats.recent_errors) - 10} more")
    print()
    print(f"Last {stats.days} Days Statistics:")
    print(f"  Total runs: {stats.runs:,}")
    print(f"  Images processed: {stats.images:,}")
    print(f"  Successful: {stats.successful:,}")
    print(f"  Uncertain: {stats.uncertain:,}")
    print(f"  Failed: {stats.failed:,}")
    print(f"  Success rate: {stats.success_rate:.1f}%")
    print()
    print(RULE)

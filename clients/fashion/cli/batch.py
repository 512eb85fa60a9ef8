"""`fashion batch submit|status|list|watch|cancel|run|health`: batch jobs, through the Batch service
or embedded (`run`: the same job in this process, no Batch server; for cron users).

DIR is a folder under the data root: relative to it ("inbox"), or a path on this machine inside
it ("data/inbox", absolute paths); a path that leaves the data root is refused.

Exit codes: 0 success; 1 the job failed or was cancelled, or (health) batch processing is
unhealthy; 2 bad arguments or the service could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime

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

from fashion.cli.server import server_function
from fashion.client.batch import BatchClient, state_name
from fashion.v1 import batch_pb2 as pb

RULE = "=" * 60
ERROR_WINDOW_H = 24.0
EXIT_OK, EXIT_UNHEALTHY, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def _folder_arg(raw: str) -> str:
    """A folder as the server understands it: a path that exists on this machine as its absolute real path
    (the server accepts it when it lies under the data root, and says why not otherwise), anything else as
    typed (relative to the server's data root)."""
    if not raw or not os.path.exists(raw):
        return raw
    return os.path.realpath(raw)


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


def run_embedded(args: argparse.Namespace) -> int:
    run_folder = server_function("batch_run", "batch run")
    console = Console(stderr=args.json)
    display = JobProgress(console)

    def started(job_id: str, resumed: bool) -> None:
        if resumed:
            console.print(f"Resuming interrupted job {job_id}")
        display.failures.clear()

    try:
        with display:
            job = run_folder(_folder_arg(args.dir), _folder_arg(args.output), args.copy, args.min_confidence,
                             args.recursive, args.inference_address, args.shard_count, args.shard_index,
                             on_start=started, on_update=display.update)
    except KeyboardInterrupt:
        console.print("Interrupted: run the same command again to resume the job where it stopped")
        return EXIT_INTERRUPTED
    except ValueError as exc:  # folders or options refused, with the reason
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(_as_json(job))
    else:
        print_summary(console, job, display.failures)
    return EXIT_OK if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_UNHEALTHY


# --- health ------------------------------------------------------------------------------------


def health(args: argparse.Namespace) -> int:
    try:
        if args.local:
            stats, last_failed, stale_hours = server_function("batch_health", "batch health --local")(args.days)
        else:
            stats, last_failed = _remote_health(args)
            stale_hours = float(os.environ.get("FASHION_BATCH_STALE_HOURS") or 26.0)
        max_age = args.max_age_hours if args.max_age_hours is not None else stale_hours
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

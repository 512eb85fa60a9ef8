"""`fashion batch submit|status|list|watch|cancel|run|health`: batch jobs, through the Batch service
or embedded (`run`: the same job in this process, no Batch server; for cron users).

DIR is a folder under the data root: relative to it ("inbox"), or a path on this machine inside
it ("data/inbox", absolute paths); a path that leaves the data root is refused.

Exit codes: 0 success; 1 the job failed or was cancelled, or (health) batch processing is
unhealthy; 2 bad arguments or the service could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from datetime import datetime

import grpc
from rich import box
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

from fashion.cli.errors import rpc_failure
from fashion.cli.server import server_function
from fashion.cli.terminal import console as new_console
from fashion.cli.terminal import literal, silence_stdout
from fashion.client.batch import FINISHED, RECONNECT_S, BatchClient, state_name
from fashion.client.protojson import dumps, to_json
from fashion.client.text import printable
from fashion.v1 import batch_pb2 as pb
from fashion.v1 import health_pb2

RULE = "=" * 60
ERROR_WINDOW_H = 24.0
EXIT_OK, EXIT_UNHEALTHY, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def _folder_arg(raw: str) -> str:
    """A folder as the server understands it: a path that exists on this machine, or one to be made in a
    folder that does ("data/new_out"), as its absolute real path (the server accepts it when it lies under
    the data root, and says why not otherwise); anything else as typed (relative to the server's data root)."""
    if not raw:
        return raw
    if os.path.exists(raw):
        return os.path.realpath(raw)
    parent, name = os.path.split(raw.rstrip("/"))
    if parent and os.path.isdir(parent):
        return os.path.join(os.path.realpath(parent), name)
    return raw


def _rpc_error(exc: grpc.RpcError, address: str) -> int:
    print(rpc_failure(exc, "Batch", address), file=sys.stderr)
    return EXIT_ERROR


# --- submit / watch ----------------------------------------------------------------------------


def submit(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            job = client.submit(_folder_arg(args.dir), "copy" if args.copy else "", args.min_confidence,
                                args.recursive, _folder_arg(args.output), args.key)
            if not args.wait:
                if args.json:
                    print(dumps(job))
                else:
                    print(f"Job {job.job_id} {state_name(job.state)}: {printable(job.input_dir)} -> "
                          f"{printable(job.output_dir)}")
                    print(f"Follow it with: fashion batch watch {job.job_id}")
                return EXIT_OK
            return _follow(client, job, args.json)
    except grpc.RpcError as exc:
        return _rpc_error(exc, args.address)


def watch(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            return _follow(client, client.get(args.job_id), False)
    except grpc.RpcError as exc:
        return _rpc_error(exc, args.address)


def _follow(client: BatchClient, job: pb.Job, as_json: bool) -> int:
    console = new_console(stderr=as_json)
    display = JobProgress(console)
    try:
        with display:
            display.update(job)

            def lost(exc: grpc.RpcError) -> None:  # a restart (a crash, a rolling update): the job goes on there
                console.print(f"Lost the Batch service ({exc.details()}); job {job.job_id} goes on there: following "
                              f"it again once the service answers (up to {RECONNECT_S / 60:g} minutes; Ctrl-C stops "
                              "watching)", markup=False, highlight=False)

            for event in client.follow(job.job_id, on_lost=lost):  # ends after the job's last event
                job = event.job
                display.update(job, event)
    except KeyboardInterrupt:
        console.print(f"Stopped watching; job {job.job_id} goes on. Follow it with: fashion batch watch "
                      f"{job.job_id}, stop it with: fashion batch cancel {job.job_id}")
        return EXIT_INTERRUPTED
    if as_json:
        print(dumps(job))
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
        return self  # the bar shows from the job's first update: a job refused at once prints only why

    def __exit__(self, *exc: object) -> None:
        if self._progress.live.is_started:
            self._progress.stop()

    def update(self, job: pb.Job, event: pb.JobEvent | None = None) -> None:
        if not self._progress.live.is_started:
            self._progress.start()
        description = f"{job.job_id[:8]} {state_name(job.state).lower()}"
        known = job.total or job.state in FINISHED  # an empty folder's finished job: 0/0, not 0/?
        self._progress.update(self._task, description=description, total=job.total if known else None,
                              completed=job.processed)
        if event is not None:
            self.failures.extend(f for f in event.files if f.status == "failed")
        message = event.message if event is not None else ""
        if job.state == pb.JOB_STATE_WAITING and message and message != self._last_message:
            self._progress.console.print(literal(message, "yellow"))
        self._last_message = message


def print_summary(console: Console, job: pb.Job, failures: Iterable[pb.FileResult] = ()) -> None:
    state = state_name(job.state)
    color = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow"}.get(state, "white")
    table = Table(title=f"Batch job {job.job_id}: [{color}]{state}[/{color}]", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rate = job.processed / job.duration_seconds if job.duration_seconds else 0.0
    rows = [
        ("Input", f"{printable(job.input_dir)} ({'copy' if job.mode == pb.TRANSFER_MODE_COPY else 'move'}"
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
        table.add_row(name, literal(value))
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
            errors.add_row(literal(f.filename), literal(f.error))
        if len(failures) > 20:
            errors.add_row(f"... and {len(failures) - 20} more", "see the summary JSON")
        console.print(errors)


# --- status / list / cancel --------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            job = client.get(args.job_id)
    except grpc.RpcError as exc:
        return _rpc_error(exc, args.address)
    if args.json:
        print(dumps(job))
    else:
        print_summary(new_console(), job)
    return EXIT_UNHEALTHY if job.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED) else EXIT_OK


def list_jobs(args: argparse.Namespace) -> int:
    state = pb.JobState.Value(f"JOB_STATE_{args.state.upper()}") if args.state else pb.JOB_STATE_UNSPECIFIED
    try:
        with BatchClient(args.address) as client:
            jobs = client.list(args.limit, state)
    except grpc.RpcError as exc:
        return _rpc_error(exc, args.address)
    if args.json:
        print(dumps([to_json(j) for j in jobs]))
        return EXIT_OK
    # Fits the console (80 columns when the output is not a terminal: cron logs, pipes): every column whole
    # (the job id's first 8 characters: any unique prefix of 6 or more is enough for the other commands),
    # the input folder last, cut to what is left with an ellipsis; the trigger is in `status` and --json.
    console = new_console()
    headers = ("job", "state", "created", "images", "ok", "uncertain", "failed", "took")
    rows = [[j.job_id[:8], state_name(j.state).lower(),
             datetime.fromtimestamp(j.created_at.seconds).strftime("%m-%d %H:%M"), f"{j.processed}/{j.total}",
             str(j.successful), str(j.uncertain), str(j.failed), f"{j.duration_seconds:.1f}s"] for j in jobs]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    room = max(8, console.width - sum(w + 2 for w in widths))  # each column: its padding and a separator
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 3 else "right", no_wrap=True, min_width=widths[i])
    table.add_column("input", no_wrap=True)
    for j, row in zip(jobs, rows, strict=True):
        folder = literal(j.input_dir)
        folder.truncate(room, overflow="ellipsis")
        table.add_row(*row, folder)
    console.print(table)
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    try:
        with BatchClient(args.address) as client:
            job = client.cancel(args.job_id)
    except grpc.RpcError as exc:
        return _rpc_error(exc, args.address)
    if args.json:
        print(dumps(job))
    else:
        print(f"Job {job.job_id}: {state_name(job.state)} ({job.processed} of {job.total} images processed; "
              "the rest stay where they are)")
    return EXIT_OK


# --- embedded run ------------------------------------------------------------------------------


def run_embedded(args: argparse.Namespace) -> int:
    run_folder = server_function("batch_run", "batch run")
    console = new_console(stderr=args.json, keep_going=True)  # the job finishes whoever reads
    display = JobProgress(console)
    resumed: list[tuple[pb.Job, list[pb.FileResult]]] = []
    """Interrupted jobs of this folder that the run finished first, with their failures."""

    def started(job_id: str, is_resumed: bool) -> None:
        if is_resumed:
            console.print(f"Resuming interrupted job {job_id}")
        display.failures.clear()

    def resumed_job_ended(job: pb.Job) -> None:
        resumed.append((job, list(display.failures)))

    try:
        with display:
            job = run_folder(_folder_arg(args.dir), _folder_arg(args.output), args.copy, args.min_confidence,
                             args.recursive, args.inference_address, args.shard_count, args.shard_index,
                             on_start=started, on_update=display.update, on_resumed=resumed_job_ended,
                             max_wait_s=args.max_wait)
    except KeyboardInterrupt:
        console.print("Interrupted: run the same command again to resume the job where it stopped")
        return EXIT_INTERRUPTED
    except ValueError as exc:  # folders or options refused, with the reason
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        document = to_json(job)
        if resumed:  # the job the command was asked for stays the document; the resumed ones come with it
            document["resumed_jobs"] = [to_json(earlier) for earlier, _ in resumed]
        try:
            print(dumps(document), flush=True)
        except BrokenPipeError:  # the reader has gone: the exit code still tells how the jobs went
            silence_stdout()
    else:
        for earlier, failures in resumed:
            print_summary(console, earlier, failures)
        print_summary(console, job, display.failures)
    succeeded = all(j.state == pb.JOB_STATE_SUCCEEDED for j in [*(earlier for earlier, _ in resumed), job])
    return EXIT_OK if succeeded else EXIT_UNHEALTHY


# --- health ------------------------------------------------------------------------------------


def health(args: argparse.Namespace) -> int:
    try:
        if args.local:
            report = server_function("batch_health", "batch health --local")(args.days, args.max_age_hours)
        else:
            with BatchClient(args.address) as client:
                report = client.batch_health(args.days, args.max_age_hours)
    except grpc.RpcError as exc:
        reason = f"the Batch service at {args.address} did not answer: {exc.code().name}: {exc.details()}"
        print(f"error: {reason}", file=sys.stderr)
        if args.json:  # a health check read by a script gets a document either way
            print(dumps({"healthy": False, "status": "unknown", "error": reason}))
        return EXIT_ERROR
    healthy = report.status != health_pb2.HEALTH_STATUS_UNHEALTHY  # degraded: warnings, still exit 0
    if args.json:
        print(dumps({**to_json(report), "healthy": healthy}))
    else:
        print(batch_health_text(report))
    return EXIT_OK if healthy else EXIT_UNHEALTHY


def batch_health_text(report: pb.BatchHealth) -> str:
    """The monitoring guide's check_batch_health.py report, word for word where it had words."""
    stats = report.stats
    lines = [RULE, "BATCH PROCESSING HEALTH CHECK", RULE, ""]
    lines += [f"Recent Execution: {'✓ HEALTHY' if report.recent_run else '✗ UNHEALTHY'}", f"  {report.message}", ""]
    if report.HasField("failed_job"):
        lines.append(f"Recent Errors: ✗ Job {report.failed_job.job_id} FAILED: {printable(report.failed_job.error)}")
    elif report.recent_errors:
        lines.append(f"Recent Errors: ⚠ {len(report.recent_errors)} errors in the last {ERROR_WINDOW_H:g} hours")
    else:
        lines.append("Recent Errors: ✓ No errors detected")
    lines += [f"  {printable(line)}" for line in report.recent_errors[:10]]
    if len(report.recent_errors) > 10:
        lines.append(f"  ... and {len(report.recent_errors) - 10} more")
    lines += ["", f"Last {stats.days} Days Statistics:", f"  Total runs: {stats.runs:,}",
              f"  Images processed: {stats.images:,}", f"  Successful: {stats.successful:,}",
              f"  Uncertain: {stats.uncertain:,}", f"  Failed: {stats.failed:,}",
              f"  Success rate: {stats.success_rate:.1f}%"]
    if stats.top_categories:
        top = ", ".join(f"{c.category} {c.count:,}" for c in list(stats.top_categories)[:5])
        lines.append(f"  Top categories: {top}")
    lines += ["", RULE]
    return "\n".join(lines)

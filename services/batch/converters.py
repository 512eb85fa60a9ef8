"""Domain records to fashion.v1 batch messages and back (the servicer and the CLI's local mode use them)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from fashion.v1 import batch_pb2 as pb
from services.batch.events import FileUpdate, JobUpdate
from services.batch.records import JobRecord, JobState
from services.batch.reports import RunFiles
from services.batch.stats import BatchHistory
from services.common.config import BatchSettings

STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.WAITING: pb.JOB_STATE_WAITING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
STATE_OF = {v: k for k, v in STATES.items()}
MODES = {"move": pb.TRANSFER_MODE_MOVE, "copy": pb.TRANSFER_MODE_COPY}
MODE_OF = {pb.TRANSFER_MODE_MOVE: "move", pb.TRANSFER_MODE_COPY: "copy"}


class UnknownValue(ValueError):
    """A request carries an enum number this server does not define (proto3 enums are open)."""


def mode_of(mode: int) -> str:
    """A request's TransferMode: "move", "copy", or "" (unspecified: the server's default). Raises UnknownValue,
    never a default: an unknown mode taken as a move would move the caller's files."""
    if mode == pb.TRANSFER_MODE_UNSPECIFIED:
        return ""
    if mode not in MODE_OF:
        raise UnknownValue(f"unknown transfer mode {mode}: use TRANSFER_MODE_MOVE ({pb.TRANSFER_MODE_MOVE}), "
                           f"TRANSFER_MODE_COPY ({pb.TRANSFER_MODE_COPY}) or leave it unspecified (the server's "
                           "default)")
    return MODE_OF[mode]


def state_of(state: int) -> JobState | None:
    """A request's JobState filter (None: unspecified, all states). Raises UnknownValue."""
    if state == pb.JOB_STATE_UNSPECIFIED:
        return None
    if state not in STATE_OF:
        raise UnknownValue(f"unknown job state {state}: use one of {', '.join(pb.JobState.keys()[1:])}, or "
                           "leave it unspecified (all states)")
    return STATE_OF[state]


def timestamp(ts: float | None) -> Timestamp | None:
    if ts is None:
        return None
    t = Timestamp()
    t.FromNanoseconds(int(ts * 1e9))
    return t


def job_to_pb(job: JobRecord, settings: BatchSettings) -> pb.Job:
    c = job.counts
    msg = pb.Job(
        job_id=job.job_id, state=STATES[job.state], input_dir=job.input_dir, output_dir=job.output_dir,
        mode=MODES[job.mode], min_confidence=job.min_confidence or 0.0, recursive=job.recursive,
        trigger=job.trigger, created_at=timestamp(job.created_at), started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at), total=job.total, processed=c.processed, successful=c.successful,
        failed=c.failed, uncertain=c.uncertain, skipped=job.skipped, categories=c.categories, error=job.error,
        duration_seconds=job.duration_s(),
    )
    if job.stamp:
        files = RunFiles.of(job.stamp, settings.results_dir, settings.log_dir)
        msg.results_csv, msg.summary_json, msg.log_file = str(files.csv), str(files.summary), str(files.log)
    return msg


def file_to_pb(f: FileUpdate) -> pb.FileResult:
    return pb.FileResult(filename=f.filename, category=f.category, confidence=f.confidence, status=f.status,
                         destination=f.destination, error=f.error)


def event_to_pb(update: JobUpdate, settings: BatchSettings) -> pb.JobEvent:
    return pb.JobEvent(job=job_to_pb(update.job, settings), message=update.message,
                       files=[file_to_pb(f) for f in update.files])


def history_to_pb(h: BatchHistory) -> pb.BatchStats:
    return pb.BatchStats(
        days=h.days, last_run_at=timestamp(h.last_run_at), last_run_age_hours=h.last_run_age_hours, runs=h.runs,
        images=h.images, successful=h.successful, failed=h.failed, uncertain=h.uncertain,
        success_rate=h.success_rate,
        top_categories=[pb.CategoryCount(category=name, count=n) for name, n in h.top_categories],
        daily=[pb.DailyBatchStats(
            date=d.date, runs=d.runs, images=d.images, successful=d.successful, failed=d.failed,
            uncertain=d.uncertain, mean_confidence=d.mean_confidence, success_rate=d.success_rate,
            categories=[pb.CategoryCount(category=name, count=n)
                        for name, n in sorted(d.categories.items(), key=lambda kv: (-kv[1], kv[0]))],
        ) for d in h.daily],
        recent_errors=h.recent_errors, active_jobs=h.active_jobs, data_root=h.data_root,
        data_total_bytes=h.data_total_bytes, data_free_bytes=h.data_free_bytes,
    )

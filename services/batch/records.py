"""The Batch service's records: a job, its images' rows, and the states and outcomes they go through;
what the job store (store.py: SQLite or PostgreSQL) keeps and the runner, reports and API read. Paths are relative to
the data root; times are Unix seconds.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

STAMP_FORMAT = "%Y%m%d_%H%M%S"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.WAITING)


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    UNCERTAIN = "uncertain"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Not an image (or a link, or still being written): left in place."""
    UNPROCESSED = "unprocessed"
    """The job was cancelled or failed before reaching the image: left in place."""


PROCESSED = (Outcome.SUCCESS, Outcome.UNCERTAIN, Outcome.FAILED)


@dataclass(frozen=True)
class JobSpec:
    """What a caller asks for; folders relative to the data root."""

    input_dir: str
    output_dir: str
    mode: str = "move"
    min_confidence: float | None = None
    recursive: bool = False
    idempotency_key: str = ""


@dataclass
class Counts:
    successful: int = 0
    uncertain: int = 0
    failed: int = 0
    unprocessed: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0
    """Sum of top-1 confidences of the classified images (successful and uncertain)."""

    @property
    def processed(self) -> int:
        return self.successful + self.uncertain + self.failed


@dataclass
class JobRecord:
    job_id: str
    state: JobState
    trigger: str
    input_dir: str
    output_dir: str
    mode: str
    min_confidence: float | None
    recursive: bool
    idempotency_key: str | None
    stamp: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    scanned: bool
    total: int
    skipped: int
    cancel_requested: bool
    error: str
    counts: Counts
    ending: JobState | None = None
    """The end state decided before the reports were written (None until then)."""

    def duration_s(self, now: float | None = None) -> float:
        if self.started_at is None:
            return 0.0
        end = self.finished_at if self.finished_at is not None else (now or time.time())
        return max(0.0, end - self.started_at)


@dataclass
class FileRecord:
    job_id: str
    seq: int
    source: str
    state: str
    outcome: str
    category: str
    confidence: float | None
    destination: str
    error: str
    finished_at: float | None
    worker: str = ""
    """The process (JobStore.worker) that claimed the row while it is not done; "" when unclaimed."""


@dataclass(frozen=True)
class FilePlan:
    """A classified image and where it goes: written before the file is touched."""

    seq: int
    outcome: Outcome
    category: str
    confidence: float | None
    destination: str
    error: str = ""


@dataclass(frozen=True)
class FileDone:
    seq: int
    outcome: Outcome
    destination: str
    error: str = ""

"""The Batch service's records: a job, its images' rows, and the states and outcomes they go through;
what the job store (store.py: SQLite or PostgreSQL) keeps and the runner, reports and API read. Paths are relative to
the data root; times are Unix seconds.
"""

from __future__ import annotations

import enum
import os
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
    classified: str = ""
    """FileIdentity.text() of the file whose bytes were classified, recorded with the plan; "" before."""


@dataclass(frozen=True)
class FileIdentity:
    """A file as it was when read for classification: which inode, its size and times. The file moved must
    still be that one, unchanged; otherwise the verdict is about other bytes (a re-upload renamed over the
    name, or a file still being written)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    links: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)

    @classmethod
    def parse(cls, text: str) -> FileIdentity | None:
        """From `text()`; None for "" (rows recorded by an earlier release)."""
        return cls(*map(int, text.split(":"))) if text else None

    def text(self) -> str:
        return f"{self.device}:{self.inode}:{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.links}"

    def same_file(self, st: os.stat_result) -> bool:
        return (self.device, self.inode) == (st.st_dev, st.st_ino)

    def changed(self, st: os.stat_result) -> bool:
        """Whether the file's bytes may differ from then: its size or modification time, or its change time
        (a rewrite that set size and mtime back, as `cp -p` does) unless its link count changed, which alone
        moves the change time (linked, unlinked or renamed over: its bytes are the same)."""
        return (self.size != st.st_size or self.mtime_ns != st.st_mtime_ns
                or (self.links == st.st_nlink and self.ctime_ns != st.st_ctime_ns))

    def unchanged_file(self, st: os.stat_result) -> bool:
        """`st` describes this very file, its bytes as they were."""
        return self.same_file(st) and not self.changed(st)

    def copied_to(self, st: os.stat_result) -> bool:
        """`st` may describe a copy of it: copies keep the size and the modification time."""
        return (self.size, self.mtime_ns) == (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class FilePlan:
    """A classified image and where it goes: written before the file is touched."""

    seq: int
    outcome: Outcome
    category: str
    confidence: float | None
    destination: str
    error: str = ""
    classified: FileIdentity | None = None
    """The file whose bytes were classified (None: not read, or recorded by an earlier release)."""


@dataclass(frozen=True)
class FileDone:
    seq: int
    outcome: Outcome
    destination: str
    error: str = ""

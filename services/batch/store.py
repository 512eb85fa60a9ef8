"""Jobs and per-file state in SQLite (stdlib sqlite3, WAL): what makes a crashed job resumable.

Each image of a job is one row that goes pending -> moving -> done. "moving" is written, with
the destination chosen, before the file is touched (write-ahead), so after a crash every row
is either untouched (pending), finishable from its record (moving, see FileMover.complete), or
done. Two partial unique indexes keep concurrent jobs (in this process or another: the
Batch service and `fashion batch run` share the file) apart: a source file belongs to at most
one unfinished row, and a destination name is reserved by at most one row in flight.

Write-ahead records are committed with an fsync (synchronous=FULL), so they survive a power loss;
the records that can be redone from them skip it.
Paths are stored relative to the data root. Times are Unix seconds.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from services.batch.records import (
    ACTIVE_STATES,
    PROCESSED,
    STAMP_FORMAT,
    Counts,
    FileDone,
    FilePlan,
    FileRecord,
    JobRecord,
    JobSpec,
    JobState,
    Outcome,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    trigger TEXT NOT NULL,
    input_dir TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    mode TEXT NOT NULL,
    min_confidence REAL,
    recursive INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    stamp TEXT UNIQUE,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    scanned INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    totals TEXT,
    ending TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs(finished_at);
CREATE INDEX IF NOT EXISTS jobs_by_creation ON jobs(created_at);
CREATE TABLE IF NOT EXISTS files (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT '',
    category TEXT NOT NULL DEFAULT '',
    confidence REAL,
    destination TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    finished_at REAL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS files_claimed_source ON files(source) WHERE state != 'done';
CREATE UNIQUE INDEX IF NOT EXISTS files_reserved_destination ON files(destination) WHERE state = 'moving';
CREATE INDEX IF NOT EXISTS files_errors ON files(finished_at) WHERE outcome = 'failed';
"""

class JobNotFound(LookupError):
    pass


class JobFinished(RuntimeError):
    """The job already ended (it cannot be cancelled)."""


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    """The jobs database. Thread-safe (one connection behind a lock); several processes may share the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "ending" not in columns:  # a database of an earlier release
            self._db.execute("ALTER TABLE jobs ADD COLUMN ending TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks).

        Every commit survives a crash of the process (WAL). `durable` commits also survive a power
        loss (fsync): the write-ahead records, which must be on disk before a file moves, and what
        a caller was told (a job created, a cancellation). The others can be redone from those.
        """
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- jobs ----------------------------------------------------------------------------------

    def create(self, spec: JobSpec, trigger: str, now: float | None = None, job_id: str | None = None) -> JobRecord:
        """A new QUEUED job, or the existing one with the same idempotency key. `job_id` lets a caller
        lock the job (JobLock) before it exists, so that no other process adopts it meanwhile."""
        now = now or time.time()
        with self._tx(durable=True) as db:
            if spec.idempotency_key:
                row = db.execute("SELECT job_id FROM jobs WHERE idempotency_key = ?",
                                 (spec.idempotency_key,)).fetchone()
                if row is not None:
                    return self.get(row["job_id"])
            job_id = job_id or new_job_id()
            db.execute(
                "INSERT INTO jobs (job_id, state, trigger, input_dir, output_dir, mode, min_confidence, recursive,"
                " idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, JobState.QUEUED, trigger, spec.input_dir, spec.output_dir, spec.mode, spec.min_confidence,
                 int(spec.recursive), spec.idempotency_key or None, now))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        """By id, or by a unique prefix of at least 6 characters. Raises JobNotFound."""
        rows = self._rows("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if not rows and len(job_id) >= 6 and job_id.isalnum():
            rows = self._rows("SELECT * FROM jobs WHERE job_id LIKE ? LIMIT 2", (job_id + "%",))
            if len(rows) > 1:
                raise JobNotFound(f"job id prefix {job_id!r} is ambiguous")
        if not rows:
            raise JobNotFound(f"no job {job_id!r}")
        return self._record(rows[0])

    def list(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        """Most recent first."""
        if state is None:
            rows = self._rows("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._rows("SELECT * FROM jobs WHERE state = ? ORDER BY created_at DESC LIMIT ?", (state, limit))
        return [self._record(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        """Jobs queued, running or waiting, oldest first (to resume after a restart)."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        rows = self._rows(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at", ACTIVE_STATES)
        return [self._record(r) for r in rows]

    def start(self, job_id: str, now: float | None = None) -> JobRecord:
        """RUNNING; the first start also fixes the run's timestamp (unique: the files are named after it)."""
        now = now or time.time()
        with self._tx() as db:
            row = db.execute("SELECT stamp, started_at FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            stamp, started = row["stamp"], row["started_at"]
            if stamp is None:
                t = int(now)
                while True:
                    stamp = datetime.fromtimestamp(t).strftime(STAMP_FORMAT)
                    if db.execute("SELECT 1 FROM jobs WHERE stamp = ?", (stamp,)).fetchone() is None:
                        break
                    t += 1  # two runs in one second: the later is named one second on
            db.execute("UPDATE jobs SET state = ?, stamp = ?, started_at = ?,"
                       " error = CASE WHEN ending IS NULL THEN '' ELSE error END WHERE job_id = ?",
                       (JobState.RUNNING, stamp, started or now, job_id))
        return self.get(job_id)

    def set_state(self, job_id: str, state: JobState, error: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, error = ? WHERE job_id = ? AND state NOT IN (?, ?, ?)",
                       (state, error, job_id, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))

    def set_min_confidence(self, job_id: str, value: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET min_confidence = ? WHERE job_id = ? AND min_confidence IS NULL",
                       (round(value, 4), job_id))  # the model's float32, without its binary noise

    def request_cancel(self, job_id: str, now: float | None = None) -> JobRecord:
        """Flag the job; a QUEUED job is CANCELLED at once, a running one stops at its next chunk."""
        job = self.get(job_id)
        if job.state.finished:
            raise JobFinished(f"job {job.job_id} already ended: {job.state.name}")
        with self._tx(durable=True) as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job.job_id,))
            if job.state == JobState.QUEUED and not job.scanned:
                db.execute("UPDATE jobs SET state = ?, finished_at = ?, totals = ? WHERE job_id = ? AND state = ?",
                           (JobState.CANCELLED, now or time.time(), _totals_json(Counts()), job.job_id,
                            JobState.QUEUED))
        return self.get(job.job_id)

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._rows("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def set_ending(self, job_id: str, state: JobState, error: str) -> None:
        """Record the end state a job is finishing in, before its reports are written: a restart that
        finds it only writes the reports again and ends the job in this state."""
        with self._tx(durable=True) as db:
            db.execute("UPDATE jobs SET ending = ?, error = ? WHERE job_id = ?", (state, error, job_id))

    def finish(self, job_id: str, state: JobState, error: str = "", now: float | None = None) -> JobRecord:
        """Terminal state, with the totals frozen (file rows may be pruned later)."""
        counts = self.counts(job_id)
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ?, totals = ? WHERE job_id = ?",
                       (state, error, now or time.time(), _totals_json(counts), job_id))
        return self.get(job_id)

    # --- files ---------------------------------------------------------------------------------

    def add_files(self, job_id: str, images: Sequence[str], skipped: Sequence[tuple[str, str]],
                  now: float | None = None) -> JobRecord:
        """Record the scan (once). Images another unfinished job already holds are reported as skipped."""
        now = now or time.time()
        with self._tx() as db:
            if db.execute("SELECT scanned FROM jobs WHERE job_id = ?", (job_id,)).fetchone()["scanned"]:
                return self.get(job_id)
            claimed = _claimed(db, images)
            mine = [s for s in images if s not in claimed]
            left = [*skipped, *((s, f"being processed by job {claimed[s]}") for s in images if s in claimed)]
            db.executemany("INSERT INTO files (job_id, seq, source, state) VALUES (?, ?, ?, 'pending')",
                           [(job_id, i, s) for i, s in enumerate(mine, 1)])
            db.executemany(
                "INSERT INTO files (job_id, seq, source, state, outcome, destination, error, finished_at)"
                " VALUES (?, ?, ?, 'done', ?, ?, ?, ?)",
                [(job_id, len(mine) + i, s, Outcome.SKIPPED, s, reason, now) for i, (s, reason) in enumerate(left, 1)])
            db.execute("UPDATE jobs SET scanned = 1, total = ?, skipped = ? WHERE job_id = ?",
                       (len(mine), len(left), job_id))
        return self.get(job_id)

    def pending(self, job_id: str, after_seq: int = 0, limit: int = 256) -> list[FileRecord]:
        rows = self._rows("SELECT * FROM files WHERE job_id = ? AND state = 'pending' AND seq > ? ORDER BY seq LIMIT ?",
                          (job_id, after_seq, limit))
        return [FileRecord(**dict(r)) for r in rows]

    def in_flight(self, job_id: str) -> list[FileRecord]:
        """Rows recorded as moving: transfers a crash may have interrupted."""
        rows = self._rows("SELECT * FROM files WHERE job_id = ? AND state = 'moving' ORDER BY seq", (job_id,))
        return [FileRecord(**dict(r)) for r in rows]

    def reserved_destinations(self) -> set[str]:
        return {r["destination"] for r in self._rows("SELECT destination FROM files WHERE state = 'moving'")}

    def plan(self, job_id: str, plans: Sequence[FilePlan]) -> None:
        """Write-ahead: record each image's outcome and destination before it is moved.
        Raises sqlite3.IntegrityError when another job reserved one of the destinations meanwhile."""
        with self._tx(durable=True) as db:
            db.executemany(
                "UPDATE files SET state = 'moving', outcome = ?, category = ?, confidence = ?, destination = ?,"
                " error = ? WHERE job_id = ? AND seq = ? AND state = 'pending'",
                [(p.outcome, p.category, p.confidence, p.destination, p.error, job_id, p.seq) for p in plans])

    def replan(self, job_id: str, seq: int, destination: str) -> None:
        """A recorded destination turned out taken: record the new one before trying it."""
        with self._tx(durable=True) as db:
            db.execute("UPDATE files SET destination = ? WHERE job_id = ? AND seq = ? AND state = 'moving'",
                       (destination, job_id, seq))

    def done(self, job_id: str, results: Sequence[FileDone], now: float | None = None) -> None:
        now = now or time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE files SET state = 'done', outcome = ?, destination = ?, error = ?, finished_at = ?"
                " WHERE job_id = ? AND seq = ? AND state != 'done'",
                [(r.outcome, r.destination, r.error, now, job_id, r.seq) for r in results])

    def release_pending(self, job_id: str, now: float | None = None) -> int:
        """Images not reached (cancelled or failed job) are left in place and freed for later jobs."""
        with self._tx() as db:
            cur = db.execute("UPDATE files SET state = 'done', outcome = ?, destination = source, finished_at = ?"
                             " WHERE job_id = ? AND state = 'pending'", (Outcome.UNPROCESSED, now or time.time(),
                                                                          job_id))
            return cur.rowcount

    def counts(self, job_id: str) -> Counts:
        rows = self._rows("SELECT outcome, category, COUNT(*) AS n, SUM(confidence) AS conf FROM files"
                          " WHERE job_id = ? AND state = 'done' GROUP BY outcome, category", (job_id,))
        c = Counts()
        for r in rows:
            outcome, n = r["outcome"], r["n"]
            if outcome == Outcome.SUCCESS:
                c.successful += n
                c.categories[r["category"]] = c.categories.get(r["category"], 0) + n
            elif outcome == Outcome.UNCERTAIN:
                c.uncertain += n
            elif outcome == Outcome.FAILED:
                c.failed += n
            elif outcome == Outcome.UNPROCESSED:
                c.unprocessed += n
            if outcome in (Outcome.SUCCESS, Outcome.UNCERTAIN):
                c.confidence_sum += r["conf"] or 0.0
        return c

    def files(self, job_id: str, outcomes: Sequence[Outcome] = PROCESSED) -> list[FileRecord]:
        """Finished rows with these outcomes, in processing order (the CSV is rebuilt from them)."""
        marks = ",".join("?" * len(outcomes))
        rows = self._rows(f"SELECT * FROM files WHERE job_id = ? AND state = 'done' AND outcome IN ({marks})"
                          " ORDER BY seq", (job_id, *outcomes))
        return [FileRecord(**dict(r)) for r in rows]

    # --- history -------------------------------------------------------------------------------

    def finished_since(self, since: float) -> list[JobRecord]:
        rows = self._rows("SELECT * FROM jobs WHERE finished_at >= ? ORDER BY finished_at", (since,))
        return [self._record(r) for r in rows]

    def last_finished(self) -> JobRecord | None:
        rows = self._rows("SELECT * FROM jobs WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1")
        return self._record(rows[0]) if rows else None

    def failed_files_since(self, since: float, limit: int) -> list[FileRecord]:
        rows = self._rows("SELECT * FROM files WHERE outcome = 'failed' AND finished_at >= ?"
                          " ORDER BY finished_at DESC, seq DESC LIMIT ?", (since, limit))
        return [FileRecord(**dict(r)) for r in rows]

    def prune(self, before: float) -> int:
        """Delete per-file rows of jobs that finished before `before` (their totals stay)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM files WHERE job_id IN (SELECT job_id FROM jobs WHERE finished_at < ?)",
                             (before,))
            return cur.rowcount

    # --- rows ----------------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> JobRecord:
        data = dict(row)
        totals = data.pop("totals")
        counts = _counts_from_json(totals) if totals else self.counts(data["job_id"])
        ending = data.pop("ending")
        return JobRecord(
            **{**data, "state": JobState(data["state"]), "ending": JobState(ending) if ending else None,
               "recursive": bool(data["recursive"]),
               "scanned": bool(data["scanned"]), "cancel_requested": bool(data["cancel_requested"])},
            counts=counts)


def _claimed(db: sqlite3.Connection, sources: Sequence[str]) -> dict[str, str]:
    """Which of `sources` an unfinished row (of any job) holds, and the holding job."""
    claimed: dict[str, str] = {}
    for start in range(0, len(sources), 500):
        part = sources[start: start + 500]
        marks = ",".join("?" * len(part))
        for r in db.execute(f"SELECT source, job_id FROM files WHERE state != 'done' AND source IN ({marks})", part):
            claimed[r["source"]] = r["job_id"]
    return claimed


def _totals_json(c: Counts) -> str:
    return json.dumps({"successful": c.successful, "uncertain": c.uncertain, "failed": c.failed,
                       "unprocessed": c.unprocessed, "categories": c.categories,
                       "confidence_sum": c.confidence_sum})


def _counts_from_json(text: str) -> Counts:
    return Counts(**json.loads(text))

"""Jobs and per-file state: what makes a crashed job resumable. One interface, JobStore, with two
implementations: SqliteJobStore (sqlite_store.py: one file, the embedded default) and
PostgresJobStore (postgres_store.py: one database that several Batch service replicas share).
open_job_store(settings) opens the one the settings name (FASHION_BATCH_DATABASE_URL: PostgreSQL).

Each image of a job is one row that goes pending -> moving -> done. "moving" is written, with
the destination chosen, before the file is touched (write-ahead), so after a crash every row
is either untouched (pending), finishable from its record (moving, see FileMover.complete), or
done. Two partial unique indexes keep concurrent jobs (in this process or another: the
Batch service and `fashion batch run` share the store) apart: a source file belongs to at most
one unfinished row, and a destination name is reserved by at most one row in flight.

Write-ahead records (and what a caller was told: a job created, a cancellation) are committed
durably (an fsync) before anything depends on them; the records that can be redone from them skip it.

Workers and claims. Every process that opens a store is one worker (`worker`). A row that is not
done belongs to at most one worker: claim_files hands out a job's unclaimed pending rows (on
PostgreSQL to several workers at once, SELECT ... FOR UPDATE SKIP LOCKED), plan and done act only
on the caller's own rows, and take_over gives the rows of workers that died to the caller: their
pending rows go back to the unclaimed, their moving rows become the caller's, to be finished from
their records (FileMover.complete). A job is run by one process at a time (lock_job: a flock on
SQLite, a session-level advisory lock on PostgreSQL; both end with the process); on PostgreSQL
other replicas may help with its files meanwhile, until a job that nobody runs (runnable) waits for
them. Once the job's end state is recorded (set_ending), nothing more is planned for it by anyone.

Paths are stored relative to the data root. Times are Unix seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

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
from services.common.config import BatchSettings

Row = dict[str, Any]

# The file each planned transfer's verdict is about (FileIdentity.text()), while the transfer is in flight.
# A table of its own that both stores create at every open, in one dialect: releases that do not know it
# ignore it, so a rollout's older replicas keep working beside newer ones (no schema version change).
CLASSIFIED_FILES_TABLE = """
CREATE TABLE IF NOT EXISTS classified_files (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    identity TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
)"""


class JobNotFound(LookupError):
    pass


class KeyReused(Exception):
    """An idempotency key already names a job asked with other arguments: the request is not that job's."""


class JobFinished(RuntimeError):
    """The job already ended (it cannot be cancelled)."""


class DestinationTaken(Exception):
    """Another transfer in flight reserved one of the destinations meanwhile: choose again."""


class JobClosed(Exception):
    """The job's end state is recorded (by its runner, maybe in another process): nothing more is
    planned for it. Nothing was recorded."""


class StoreUnavailable(RuntimeError):
    """The jobs database cannot be used by this process now (its connection was lost): the job runs
    stop where they are, resumable from their records, and resume when it is back."""


JOB_ID_LENGTH = 16


def new_job_id() -> str:
    return uuid.uuid4().hex[:JOB_ID_LENGTH]


def default_db_path(settings: BatchSettings) -> Path:
    """The SQLite file: FASHION_BATCH_DB, else <data_root>/.batch/jobs.db."""
    return settings.batch_db or Path(settings.data_root) / ".batch" / "jobs.db"


def open_job_store(settings: BatchSettings) -> JobStore:
    """The jobs database the settings name: PostgreSQL when FASHION_BATCH_DATABASE_URL (or its _FILE)
    is set, else the SQLite file (default_db_path). Raises StoreUnavailable when PostgreSQL cannot be
    reached, with the reason (never the password)."""
    url = settings.batch_database_url_value()
    if url:
        from services.batch.postgres_store import PostgresJobStore

        return PostgresJobStore(url)
    from services.batch.sqlite_store import SqliteJobStore

    return SqliteJobStore(default_db_path(settings))


class JobLock(ABC):
    """A job held by this process (JobStore.lock_job): no other process runs it meanwhile. Ends with the
    process, so a job whose process died can be adopted at once."""

    @abstractmethod
    def release(self, finished: bool = False) -> None:
        """Let the job go; `finished`: it ended (nothing will lock it again)."""


class Tx(Protocol):
    """One transaction (or a read) on the store's connection; SQL with ? placeholders."""

    def one(self, sql: str, args: Sequence[object] = ()) -> Row | None: ...

    def all(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    def run(self, sql: str, args: Sequence[object] = ()) -> int:
        """Execute; the number of rows changed."""
        ...

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        """Execute once per row; the number of rows changed, all executions together."""
        ...


class JobStore(ABC):
    """The jobs database. Thread-safe; several processes may share it. The queries are the same
    on both databases (portable SQL, ? placeholders); each implementation brings its connection,
    transactions, job locks, claims and the takeover of dead workers."""

    worker: str
    """This process's name among the store's workers (the files.worker of the rows it holds)."""
    folder: Path | None = None
    """The folder the store keeps its files in (the SQLite file's), which jobs may not read or write;
    None when the database is elsewhere."""
    shared: bool = False
    """Whether other processes may work on the files of a job this process runs (replicas on
    PostgreSQL): a process with nothing of its own to run may then help with another's job."""
    _conflicts: tuple[type[BaseException], ...] = ()
    """The database errors that mean "a unique index refused the row" (a destination taken meanwhile)."""

    # --- what an implementation provides ----------------------------------------------------------

    @abstractmethod
    def _transaction(self, durable: bool = False, serialized: bool = False) -> AbstractContextManager[Tx]:
        """One write transaction. `durable`: its commit survives a power loss (fsync) before it returns;
        the others survive a crash of this process. `serialized`: no other `serialized` transaction runs
        at the same time (the check-then-insert ones: idempotency keys, run stamps, claimed sources)."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Tx]:
        """Reads outside a write transaction."""

    @abstractmethod
    def lock_job(self, job_id: str) -> JobLock | None:
        """Hold the job (it need not exist yet), or None when another process (or task) holds it."""

    @abstractmethod
    def runnable(self, job_ids: Collection[str]) -> set[str]:
        """Which of these jobs are unfinished and run by no process now (their lock is free): a helper stops
        helping for them. Only stores that replicas share need tell (nobody helps on the others)."""

    @abstractmethod
    def take_over(self, job_id: str) -> int:
        """Give the caller (the job's runner: it holds lock_job) the job's rows held by workers that died:
        their pending rows are unclaimed again, their moving rows become the caller's (in_flight), to be
        finished from their records. Returns how many rows changed hands."""

    def check_session(self) -> None:
        """Raise StoreUnavailable when this process's hold on its records is over (on PostgreSQL: its session
        ended, so other replicas may be taking its transfers over): called before each file is moved, it
        touches no database, only what this process already knows. Stores whose locks end only with the
        process never raise."""
        return None

    def working(self) -> AbstractContextManager[None]:
        """Held by a run that holds no job lock (a helper) while it acts on records of this process's session:
        a store that may lose its session (PostgreSQL) does not connect again as a new worker meanwhile."""
        return contextlib.nullcontext()

    @abstractmethod
    def describe(self) -> str:
        """Where the jobs are kept, for the log (never a password)."""

    @abstractmethod
    def close(self) -> None: ...

    _share_lock = ""
    """Appended to the read of a job's row in plan(): " FOR SHARE" where concurrent writers need it."""

    def _claim(self, tx: Tx, job_id: str, limit: int) -> list[Row]:
        """Mark up to `limit` unclaimed pending rows of the job as this worker's; the rows."""
        rows = tx.all("SELECT * FROM files WHERE job_id = ? AND state = 'pending' AND state != 'done' AND worker = ''"
                      " ORDER BY seq LIMIT ?", (job_id, limit))
        tx.many("UPDATE files SET worker = ? WHERE job_id = ? AND seq = ?", [(self.worker, job_id, r["seq"])
                                                                            for r in rows])
        return [{**r, "worker": self.worker} for r in rows]

    # --- jobs ----------------------------------------------------------------------------------

    def create(self, spec: JobSpec, trigger: str, now: float | None = None, job_id: str | None = None) -> JobRecord:
        """A new QUEUED job, or the existing one with the same idempotency key when it was asked with the same
        arguments (KeyReused when not). `job_id` lets a caller lock the job (lock_job) before it exists, so
        that no other process adopts it meanwhile."""
        now = now or time.time()
        job_id = job_id or new_job_id()
        with self._transaction(durable=True, serialized=True) as tx:
            row = tx.one("SELECT * FROM jobs WHERE idempotency_key = ?", (spec.idempotency_key,)) \
                if spec.idempotency_key else None
            if row is not None:
                if differences := _spec_differences(row, spec):
                    raise KeyReused(
                        f"idempotency key {spec.idempotency_key!r} already names job {row['job_id']}, asked with "
                        f"other arguments ({'; '.join(differences)}): use another key for this request")
                job_id = row["job_id"]
            else:
                tx.run(
                    "INSERT INTO jobs (job_id, state, trigger, input_dir, output_dir, mode, min_confidence,"
                    " recursive, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, JobState.QUEUED.value, trigger, spec.input_dir, spec.output_dir, spec.mode,
                     spec.min_confidence, int(spec.recursive), spec.idempotency_key or None, now))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        """By id, or by a unique prefix of at least 6 characters. Raises JobNotFound."""
        # Before any query: ids are new_job_id()'s (a long one is never stored, and SQLite refuses a LIKE
        # pattern of a million characters as too complex); never quoted whole.
        if len(job_id) > JOB_ID_LENGTH:
            raise JobNotFound(f"no job with an id of {len(job_id)} characters: a job id has {JOB_ID_LENGTH}")
        if not job_id.isalnum():  # PostgreSQL refuses a NUL byte in a query's text
            raise JobNotFound(f"no job {job_id!r}: a job id has only letters and digits")
        with self._reading() as tx:
            rows = tx.all("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
            if not rows and len(job_id) >= 6 and job_id.isalnum():
                rows = tx.all("SELECT * FROM jobs WHERE job_id LIKE ? LIMIT 2", (job_id.lower() + "%",))
                if len(rows) > 1:
                    raise JobNotFound(f"job id prefix {job_id!r} is ambiguous")
            if not rows:
                short = " (a prefix of a job id needs at least 6 characters)" if len(job_id) < 6 else ""
                raise JobNotFound(f"no job {job_id!r}{short}")
            return self._record(tx, rows[0])

    def list(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        """Most recent first."""
        with self._reading() as tx:
            if state is None:
                rows = tx.all("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
            else:
                rows = tx.all("SELECT * FROM jobs WHERE state = ? ORDER BY created_at DESC LIMIT ?",
                              (state.value, limit))
            return [self._record(tx, r) for r in rows]

    def latest_created(self, trigger: str) -> float | None:
        """When the newest job of this trigger ("schedule", "api", ...) was created; None: never."""
        with self._reading() as tx:
            row = tx.one("SELECT MAX(created_at) AS latest FROM jobs WHERE trigger = ?", (trigger,))
            return None if row is None or row["latest"] is None else float(row["latest"])

    def unfinished(self) -> list[JobRecord]:
        """Jobs queued, running or waiting, oldest first (to resume after a restart)."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        with self._reading() as tx:
            rows = tx.all(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at",
                          [s.value for s in ACTIVE_STATES])
            return [self._record(tx, r) for r in rows]

    def unfinished_ids(self) -> list[str]:
        """The ids of the jobs queued, running or waiting, oldest first."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        with self._reading() as tx:
            rows = tx.all(f"SELECT job_id FROM jobs WHERE state IN ({marks}) ORDER BY created_at",
                          [s.value for s in ACTIVE_STATES])
        return [r["job_id"] for r in rows]

    def start(self, job_id: str, now: float | None = None) -> JobRecord:
        """RUNNING; the first start also fixes the run's timestamp (unique: the files are named after it)."""
        now = now or time.time()
        with self._transaction(serialized=True) as tx:
            row = tx.one("SELECT stamp, started_at FROM jobs WHERE job_id = ?", (job_id,))
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            stamp, started = row["stamp"], row["started_at"]
            if stamp is None:
                t = int(now)
                while True:
                    stamp = datetime.fromtimestamp(t).strftime(STAMP_FORMAT)
                    if tx.one("SELECT 1 AS taken FROM jobs WHERE stamp = ?", (stamp,)) is None:
                        break
                    t += 1  # two runs in one second: the later is named one second on
            tx.run("UPDATE jobs SET state = ?, stamp = ?, started_at = ?,"
                   " error = CASE WHEN ending IS NULL THEN '' ELSE error END WHERE job_id = ?",
                   (JobState.RUNNING.value, stamp, started or now, job_id))
        return self.get(job_id)

    def set_state(self, job_id: str, state: JobState, error: str = "") -> None:
        with self._transaction() as tx:
            tx.run("UPDATE jobs SET state = ?, error = ? WHERE job_id = ? AND state NOT IN (?, ?, ?)",
                   (state.value, error, job_id, JobState.SUCCEEDED.value, JobState.FAILED.value,
                    JobState.CANCELLED.value))

    def set_min_confidence(self, job_id: str, value: float) -> None:
        with self._transaction() as tx:
            tx.run("UPDATE jobs SET min_confidence = ? WHERE job_id = ? AND min_confidence IS NULL",
                   (round(value, 4), job_id))  # the model's float32, without its binary noise

    def request_cancel(self, job_id: str, now: float | None = None) -> JobRecord:
        """Flag the job; a QUEUED job is CANCELLED at once, a running one stops at its next chunk. A job
        already CANCELLED is returned as it is: a cancel retried after its answer was lost did what it asked.
        Raises JobFinished for a job that ended otherwise."""
        job = self.get(job_id)
        if job.state == JobState.CANCELLED:
            return job
        if job.state.finished:
            raise JobFinished(f"job {job.job_id} already ended: {job.state.name}")
        with self._transaction(durable=True) as tx:
            tx.run("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job.job_id,))
            if job.state == JobState.QUEUED and not job.scanned:
                tx.run("UPDATE jobs SET state = ?, finished_at = ?, totals = ? WHERE job_id = ? AND state = ?",
                       (JobState.CANCELLED.value, now or time.time(), _totals_json(Counts()), job.job_id,
                        JobState.QUEUED.value))
        return self.get(job.job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._reading() as tx:
            row = tx.one("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,))
        return bool(row and row["cancel_requested"])

    def closing(self, job_id: str) -> bool:
        """Whether the job is stopping or stopped: cancellation requested, end state recorded, or ended."""
        with self._reading() as tx:
            row = tx.one("SELECT cancel_requested, ending, state FROM jobs WHERE job_id = ?", (job_id,))
        return row is None or bool(row["cancel_requested"]) or row["ending"] is not None or JobState(
            row["state"]).finished

    def set_ending(self, job_id: str, state: JobState, error: str) -> None:
        """Record the end state a job is finishing in, before its reports are written: a restart that
        finds it only writes the reports again and ends the job in this state. From then on nothing more
        is planned for the job (plan raises JobClosed), by this process or another."""
        with self._transaction(durable=True) as tx:
            tx.run("UPDATE jobs SET ending = ?, error = ? WHERE job_id = ?", (state.value, error, job_id))

    def finish(self, job_id: str, state: JobState, error: str = "", now: float | None = None) -> JobRecord:
        """Terminal state, with the totals frozen (file rows may be pruned later)."""
        counts = self.counts(job_id)
        with self._transaction() as tx:
            tx.run("UPDATE jobs SET state = ?, error = ?, finished_at = ?, totals = ? WHERE job_id = ?",
                   (state.value, error, now or time.time(), _totals_json(counts), job_id))
        return self.get(job_id)

    # --- files ---------------------------------------------------------------------------------

    def add_files(self, job_id: str, images: Sequence[str], skipped: Sequence[tuple[str, str]],
                  now: float | None = None) -> JobRecord:
        """Record the scan (once). Images another unfinished job already holds are reported as skipped."""
        now = now or time.time()
        with self._transaction(serialized=True) as tx:
            row = tx.one("SELECT scanned FROM jobs WHERE job_id = ?", (job_id,))
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            if not row["scanned"]:
                self._add_files(tx, job_id, images, skipped, now)
        return self.get(job_id)

    @staticmethod
    def _add_files(tx: Tx, job_id: str, images: Sequence[str], skipped: Sequence[tuple[str, str]],
                   now: float) -> None:
        claimed = _claimed(tx, images)
        mine = [s for s in images if s not in claimed]
        left = [*skipped, *((s, f"being processed by job {claimed[s]}") for s in images if s in claimed)]
        tx.many("INSERT INTO files (job_id, seq, source, state) VALUES (?, ?, ?, 'pending')",
                [(job_id, i, s) for i, s in enumerate(mine, 1)])
        tx.many(
            "INSERT INTO files (job_id, seq, source, state, outcome, destination, error, finished_at)"
            " VALUES (?, ?, ?, 'done', ?, ?, ?, ?)",
            [(job_id, len(mine) + i, s, Outcome.SKIPPED.value, s, reason, now)
             for i, (s, reason) in enumerate(left, 1)])
        tx.run("UPDATE jobs SET scanned = 1, total = ?, skipped = ? WHERE job_id = ?",
               (len(mine), len(left), job_id))

    def claim_files(self, job_id: str, limit: int) -> list[FileRecord]:
        """Up to `limit` of the job's unclaimed pending rows, in order, now held by this worker; none once
        the job's end is recorded. Workers claiming at the same time get different rows."""
        with self._transaction() as tx:
            job = tx.one("SELECT ending FROM jobs WHERE job_id = ?", (job_id,))
            if job is None or job["ending"] is not None:
                return []
            rows = self._claim(tx, job_id, limit)
        return sorted((FileRecord(**r) for r in rows), key=lambda f: f.seq)

    def release_claims(self, job_id: str) -> int:
        """This worker's claimed pending rows of the job go back to the unclaimed (it stops early)."""
        with self._transaction() as tx:
            return tx.run("UPDATE files SET worker = '' WHERE job_id = ? AND worker = ? AND state = 'pending'",
                          (job_id, self.worker))

    def unfinished_files(self, job_id: str) -> int:
        """The job's rows not done yet, whoever holds them."""
        with self._reading() as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM files WHERE job_id = ? AND state != 'done'", (job_id,))
        return int(row["n"]) if row else 0

    def moving_elsewhere(self, job_id: str) -> int:
        """The job's rows other workers are transferring (recorded as moving, not done yet)."""
        with self._reading() as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM files WHERE job_id = ? AND state = 'moving' AND state != 'done'"
                         " AND worker != ?", (job_id, self.worker))
        return int(row["n"]) if row else 0

    def in_flight(self, job_id: str) -> list[FileRecord]:
        """This worker's rows recorded as moving: transfers a crash may have interrupted."""
        with self._reading() as tx:
            rows = tx.all("SELECT files.*, COALESCE(classified_files.identity, '') AS classified FROM files"
                          " LEFT JOIN classified_files ON classified_files.job_id = files.job_id"
                          " AND classified_files.seq = files.seq"
                          " WHERE files.job_id = ? AND state = 'moving' AND state != 'done' AND worker = ?"
                          " ORDER BY files.seq", (job_id, self.worker))
        return [FileRecord(**r) for r in rows]

    def reserved_destinations(self) -> set[str]:
        with self._reading() as tx:
            return {r["destination"] for r in tx.all("SELECT destination FROM files WHERE state = 'moving'")}

    def plan(self, job_id: str, plans: Sequence[FilePlan]) -> None:
        """Write-ahead: record each image's outcome and destination before it is moved (rows this worker
        claimed). Raises DestinationTaken when another transfer reserved one of the destinations meanwhile
        (nothing recorded), JobClosed when the job's end is recorded (nothing recorded)."""
        if not plans:
            return
        try:
            with self._transaction(durable=True) as tx:
                job = tx.one("SELECT ending FROM jobs WHERE job_id = ?" + self._share_lock, (job_id,))
                if job is None or job["ending"] is not None:
                    raise JobClosed(f"job {job_id} is ending: nothing more is planned for it")
                recorded = tx.many(
                    "UPDATE files SET state = 'moving', outcome = ?, category = ?, confidence = ?, destination = ?,"
                    " error = ? WHERE job_id = ? AND seq = ? AND state = 'pending' AND worker = ?",
                    [(p.outcome.value, p.category, p.confidence, p.destination, p.error, job_id, p.seq, self.worker)
                     for p in plans])
                tx.many("INSERT INTO classified_files (job_id, seq, identity) VALUES (?, ?, ?)"
                        " ON CONFLICT (job_id, seq) DO UPDATE SET identity = excluded.identity",
                        [(job_id, p.seq, p.classified.text()) for p in plans if p.classified is not None])
        except self._conflicts as exc:
            raise DestinationTaken(str(exc)) from None
        if recorded != len(plans):  # rows that are not this worker's: a bug, never papered over
            raise RuntimeError(f"job {job_id}: {len(plans) - recorded} of {len(plans)} rows to plan are not "
                               f"claimed by this worker ({self.worker})")

    def replan(self, job_id: str, seq: int, destination: str) -> None:
        """A recorded destination turned out taken: record the new one before trying it. Raises
        DestinationTaken when another transfer reserved it meanwhile."""
        try:
            with self._transaction(durable=True) as tx:
                tx.run("UPDATE files SET destination = ? WHERE job_id = ? AND seq = ? AND state = 'moving'"
                       " AND worker = ?", (destination, job_id, seq, self.worker))
        except self._conflicts as exc:
            raise DestinationTaken(str(exc)) from None

    def done(self, job_id: str, results: Sequence[FileDone], now: float | None = None) -> None:
        now = now or time.time()
        with self._transaction() as tx:
            tx.many(
                "UPDATE files SET state = 'done', outcome = ?, destination = ?, error = ?, finished_at = ?"
                " WHERE job_id = ? AND seq = ? AND state != 'done' AND worker = ?",
                [(r.outcome.value, r.destination, r.error, now, job_id, r.seq, self.worker) for r in results])
            tx.many("DELETE FROM classified_files WHERE job_id = ? AND seq = ?", [(job_id, r.seq) for r in results])

    def release_pending(self, job_id: str, now: float | None = None) -> int:
        """Images not reached (cancelled or failed job) are left in place and freed for later jobs; claimed
        or not (the job's end is recorded: nobody plans them any more)."""
        with self._transaction() as tx:
            return tx.run("UPDATE files SET state = 'done', outcome = ?, destination = source, finished_at = ?,"
                          " worker = '' WHERE job_id = ? AND state = 'pending'",
                          (Outcome.UNPROCESSED.value, now or time.time(), job_id))

    def counts(self, job_id: str) -> Counts:
        with self._reading() as tx:
            return _counts(tx, job_id)

    def files(self, job_id: str, outcomes: Sequence[Outcome] = PROCESSED) -> list[FileRecord]:
        """Finished rows with these outcomes, in processing order (the CSV is rebuilt from them)."""
        marks = ",".join("?" * len(outcomes))
        with self._reading() as tx:
            rows = tx.all(f"SELECT * FROM files WHERE job_id = ? AND state = 'done' AND outcome IN ({marks})"
                          " ORDER BY seq", (job_id, *(o.value for o in outcomes)))
        return [FileRecord(**r) for r in rows]

    # --- history -------------------------------------------------------------------------------

    def finished_since(self, since: float) -> list[JobRecord]:
        with self._reading() as tx:
            rows = tx.all("SELECT * FROM jobs WHERE finished_at >= ? ORDER BY finished_at", (since,))
            return [self._record(tx, r) for r in rows]

    def last_finished(self) -> JobRecord | None:
        """The last run: the job that ended last, cancelled ones left out (a job cancelled before it sorted
        anything is no run; batch health must not call a batch that never ran recent)."""
        with self._reading() as tx:
            rows = tx.all("SELECT * FROM jobs WHERE finished_at IS NOT NULL AND state != ?"
                          " ORDER BY finished_at DESC LIMIT 1", (JobState.CANCELLED.value,))
            return self._record(tx, rows[0]) if rows else None

    def failed_files_since(self, since: float, limit: int) -> list[FileRecord]:
        with self._reading() as tx:
            rows = tx.all("SELECT * FROM files WHERE outcome = 'failed' AND finished_at >= ?"
                          " ORDER BY finished_at DESC, seq DESC LIMIT ?", (since, limit))
        return [FileRecord(**r) for r in rows]

    def prune(self, before: float) -> int:
        """Delete per-file rows of jobs that finished before `before` (their totals stay)."""
        with self._transaction() as tx:
            tx.run("DELETE FROM classified_files WHERE job_id IN (SELECT job_id FROM jobs WHERE finished_at < ?)",
                   (before,))
            return tx.run("DELETE FROM files WHERE job_id IN (SELECT job_id FROM jobs WHERE finished_at < ?)",
                          (before,))

    # --- rows ----------------------------------------------------------------------------------

    @staticmethod
    def _record(tx: Tx, row: Row) -> JobRecord:
        data = dict(row)
        totals = data.pop("totals")
        counts = _counts_from_json(totals) if totals else _counts(tx, data["job_id"])
        ending = data.pop("ending")
        return JobRecord(
            **{**data, "state": JobState(data["state"]), "ending": JobState(ending) if ending else None,
               "recursive": bool(data["recursive"]),
               "scanned": bool(data["scanned"]), "cancel_requested": bool(data["cancel_requested"])},
            counts=counts)


def _spec_differences(row: Row, spec: JobSpec) -> list[str]:
    """What `spec` asks otherwise than the job of `row`, one "<field> <job's value>, not <asked>" each. An
    unset min_confidence asks for the model's default, which the job records when it runs: it matches any."""
    job = {"input_dir": row["input_dir"], "output_dir": row["output_dir"], "mode": row["mode"],
           "recursive": bool(row["recursive"])}
    differences = [f"{name} {value!r}, not {getattr(spec, name)!r}" for name, value in job.items()
                   if value != getattr(spec, name)]
    recorded = row["min_confidence"]
    if spec.min_confidence is not None and (recorded is None or not math.isclose(
            recorded, spec.min_confidence, abs_tol=1e-6)):  # a request's float32 against the model's rounded one
        differences.append(f"min_confidence {recorded!r}, not {spec.min_confidence!r}")
    return differences


def _counts(tx: Tx, job_id: str) -> Counts:
    rows = tx.all("SELECT outcome, category, COUNT(*) AS n, SUM(confidence) AS conf FROM files"
                  " WHERE job_id = ? AND state = 'done' GROUP BY outcome, category", (job_id,))
    c = Counts()
    for r in rows:
        outcome, n = r["outcome"], int(r["n"])
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


def _claimed(tx: Tx, sources: Sequence[str]) -> dict[str, str]:
    """Which of `sources` an unfinished row (of any job) holds, and the holding job."""
    claimed: dict[str, str] = {}
    for part in _parts(sources, 500):
        marks = ",".join("?" * len(part))
        for r in tx.all(f"SELECT source, job_id FROM files WHERE state != 'done' AND source IN ({marks})", part):
            claimed[r["source"]] = r["job_id"]
    return claimed


def _parts(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _totals_json(c: Counts) -> str:
    return json.dumps({"successful": c.successful, "uncertain": c.uncertain, "failed": c.failed,
                       "unprocessed": c.unprocessed, "categories": c.categories,
                       "confidence_sum": c.confidence_sum})


def _counts_from_json(text: str) -> Counts:
    return Counts(**json.loads(text))

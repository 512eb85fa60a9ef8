"""The job store in one SQLite file (stdlib sqlite3, WAL): the embedded default (`make run`,
`fashion batch run`), for processes on one machine (SQLite's locking and WAL need a local
filesystem, never a network share).

Every write transaction takes the database's write lock up front (BEGIN IMMEDIATE), so the
check-then-insert ones are serialized among all processes. Durable commits are made with
synchronous=FULL (an fsync), the others with NORMAL. A job is locked with an flock on
<db folder>/locks/<job_id>.lock, which the kernel releases when the process dies; the process
that holds a job's lock is the only one working on its files, so whatever else holds them died.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from services.batch.store import JobLock, JobStore, Row

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
    worker TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS files_claimed_source ON files(source) WHERE state != 'done';
CREATE UNIQUE INDEX IF NOT EXISTS files_reserved_destination ON files(destination) WHERE state = 'moving';
CREATE INDEX IF NOT EXISTS files_errors ON files(finished_at) WHERE outcome = 'failed';
"""
# Needs the columns a database of an earlier release lacks (added in __init__).
INDEXES = "CREATE INDEX IF NOT EXISTS files_open ON files(job_id, seq) WHERE state != 'done';"
ADDED_COLUMNS = {"jobs": {"ending": "TEXT"}, "files": {"worker": "TEXT NOT NULL DEFAULT ''"}}


class FileJobLock(JobLock):
    """An exclusive, non-blocking flock per job; the kernel drops it when its process dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def try_acquire(cls, folder: Path, job_id: str) -> FileJobLock | None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self, finished: bool = False) -> None:
        if finished:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def one(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        row = self._db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def run(self, sql: str, args: Sequence[object] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        return self._db.executemany(sql, rows).rowcount if rows else 0


class SqliteJobStore(JobStore):
    """One connection behind a lock; several processes may share the file."""

    _conflicts = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.folder = self.path.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.worker = uuid.uuid4().hex[:16]
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for table, added in ADDED_COLUMNS.items():  # a database of an earlier release
            columns = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in added.items():
                if name not in columns:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self._db.executescript(INDEXES)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, durable: bool = False, serialized: bool = False) -> Iterator[_SqliteTx]:
        """BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks), which also serializes
        every write transaction. Every commit survives a crash of the process (WAL); `durable` ones also
        a power loss (fsync)."""
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteTx(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def _reading(self) -> Iterator[_SqliteTx]:
        with self._lock:
            yield _SqliteTx(self._db)

    def lock_job(self, job_id: str) -> FileJobLock | None:
        return FileJobLock.try_acquire(self.folder / "locks", job_id)

    def runnable(self, job_ids: Collection[str]) -> set[str]:
        """All of them: nobody helps with a job on SQLite (not shared), so nobody asks."""
        return set(job_ids)

    def take_over(self, job_id: str) -> int:
        """The caller holds the job's lock, and only the lock's holder works on a job's files here: every
        other worker holding them died."""
        with self._transaction() as tx:
            return tx.run("UPDATE files SET worker = CASE WHEN state = 'moving' THEN ? ELSE '' END WHERE job_id = ?"
                          " AND state != 'done' AND worker != ? AND (worker != '' OR state = 'moving')",
                          (self.worker, job_id, self.worker))

"""The job store in one SQLite file (stdlib sqlite3, WAL): the embedded default (`make run`,
`fashion batch run`), for processes on one machine (SQLite's locking and WAL need a local
filesystem, never a network share).

Every write transaction takes the database's write lock up front (BEGIN IMMEDIATE), so the
check-then-insert ones are serialized among all processes. Durable commits are made with
synchronous=FULL (an fsync), the others with NORMAL. A job is locked with an flock on
<db folder>/locks/<job_id>.lock, which the kernel releases when the process dies; the process
that holds a job's lock is the only one working on its files, so whatever else holds them died.

The database's folder (<data_root>/.batch by default), its locks folder and the database's files are never
symbolic links: anyone who may write to the data root could have made one, and the database would be
created where it points. They are refused (DatabaseFolderRefused) rather than followed; the folders above
the database's folder are the operator's, links included.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import stat
import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from services.batch.store import CLASSIFIED_FILES_TABLE, JobLock, JobStore, Row, StoreUnavailable

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
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")  # the database's file and those SQLite adds next to it
DISK_REFUSED = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}
"""SQLite's primary result codes for a disk that refuses the database (full, failing, read-only, gone)."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DatabaseFolderRefused(StoreUnavailable):
    """The jobs database's folder, its locks folder or one of its files is a symbolic link (or not a folder):
    the database is not created or opened through it."""


def _open_subfolder(parent_fd: int, name: str, shown: Path) -> int:
    """The descriptor of the folder `name` in `parent_fd` (created if missing), never through a link."""
    try:
        os.mkdir(name, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        try:
            mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISLNK(mode):
            raise DatabaseFolderRefused(f"the jobs database folder {shown} is a symbolic link: refusing to create or "
                                        "open the jobs database through it (links are not followed there)") from None
        if not stat.S_ISDIR(mode):
            raise DatabaseFolderRefused(f"the jobs database folder {shown} is not a folder") from None
        raise


def open_database_folder(folder: Path) -> int:
    """The descriptor of the database's folder (created if missing): its parent as configured (the
    operator's), the folder itself never through a link. Raises DatabaseFolderRefused."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _open_subfolder(parent_fd, folder.name, folder)
    finally:
        os.close(parent_fd)


class FileJobLock(JobLock):
    """An exclusive, non-blocking flock per job; the kernel drops it when its process dies."""

    def __init__(self, path: Path, fd: int, folder: int) -> None:
        self.path, self._fd = path, fd
        self._folder = folder
        """The locks folder's descriptor: the lock file is unlinked there, never through a path."""

    @classmethod
    def try_acquire(cls, database_folder: Path, job_id: str) -> FileJobLock | None:
        """The job's lock in <database_folder>/locks; None when another process holds it. Raises
        DatabaseFolderRefused when a folder on the way (or the lock file) is a link."""
        folder_fd = open_database_folder(database_folder)
        try:
            locks = _open_subfolder(folder_fd, "locks", database_folder / "locks")
        finally:
            os.close(folder_fd)
        path = database_folder / "locks" / f"{job_id}.lock"
        try:
            fd = os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                         dir_fd=locks)
        except OSError as exc:
            os.close(locks)
            if exc.errno == errno.ELOOP:
                raise DatabaseFolderRefused(f"the job lock {path} is a symbolic link: not followed") from None
            raise
        try:
            # Anyone who can open the file can hold its lock (read access is enough for flock) and so stop the
            # job: only the service's user may; a lock file of an earlier release (0644) is narrowed too.
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            os.close(locks)
            return None
        return cls(path, fd, locks)

    def release(self, finished: bool = False) -> None:
        if finished:
            try:
                os.unlink(self.path.name, dir_fd=self._folder)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        os.close(self._folder)


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
        self.worker = uuid.uuid4().hex[:16]
        self._lock = threading.RLock()
        try:
            self._db = self._connect()
        except sqlite3.Error as exc:  # a full disk, a file that is not a database, a folder it may not write
            raise StoreUnavailable(f"the jobs database {self.path} cannot be opened: {self._unusable(exc)}") from None
        try:
            self._prepare()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreUnavailable(f"the jobs database {self.path} cannot be opened: {self._unusable(exc)}") from None

    def _unusable(self, exc: sqlite3.Error) -> str:
        """SQLite's reason, and whether the disk is full (SQLite calls a refused -shm file "disk I/O error")."""
        try:
            full = shutil.disk_usage(self.folder).free == 0
        except OSError:
            full = False
        return f"{exc}{' (its disk is full)' if full and 'full' not in str(exc) else ''}"

    def _prepare(self) -> None:
        """The schema, created or brought up to this release's."""
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for table, added in ADDED_COLUMNS.items():  # a database of an earlier release
            columns = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in added.items():
                if name not in columns:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self._db.executescript(INDEXES)
        self._db.execute(CLASSIFIED_FILES_TABLE)

    def _connect(self) -> sqlite3.Connection:
        """The connection, once the database's folder and files are known not to be links (SQLite opens them by
        path: the folder reached by that path is checked again once they are open)."""
        folder_fd = open_database_folder(self.folder)
        try:
            for suffix in DATABASE_SUFFIXES:
                name = self.path.name + suffix
                try:
                    st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    raise DatabaseFolderRefused(f"the jobs database file {self.folder / name} is a symbolic link: "
                                                "refusing to open the jobs database through it")
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:  # the same bytes as a file elsewhere
                    raise DatabaseFolderRefused(f"the jobs database file {self.folder / name} has other (hard) "
                                                "links: refusing to write through it")
            # Only the folder's own name could be swapped now: its parent is the operator's, resolved.
            real = Path(os.path.realpath(self.folder.parent)) / self.folder.name / self.path.name
            db = sqlite3.connect(real, isolation_level=None, check_same_thread=False, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # opens (creates) the database and its -wal, -shm files
                expected, reached = os.fstat(folder_fd), os.stat(real.parent, follow_symlinks=False)
                if (reached.st_dev, reached.st_ino) != (expected.st_dev, expected.st_ino):
                    raise DatabaseFolderRefused(f"the jobs database folder {self.folder} was replaced while the "
                                                "database was being opened: refusing to use it")
            except BaseException:
                db.close()
                raise
            return db
        finally:
            os.close(folder_fd)

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
        with self._lock, self._unwritable_said():
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteTx(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled it back itself (a full disk)
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def _reading(self) -> Iterator[_SqliteTx]:
        with self._lock, self._unwritable_said():
            yield _SqliteTx(self._db)

    @contextmanager
    def _unwritable_said(self) -> Iterator[None]:
        """A database its disk refuses (full, failing, read-only) is StoreUnavailable, as a lost PostgreSQL is: the
        job stops and resumes from its records once the database can be written again (nothing else changed)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in DISK_REFUSED:
                raise
            raise StoreUnavailable(f"the jobs database {self.path} cannot be written: {self._unusable(exc)}") from None

    def lock_job(self, job_id: str) -> FileJobLock | None:
        return FileJobLock.try_acquire(self.folder, job_id)

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

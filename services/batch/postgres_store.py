"""The job store in PostgreSQL (psycopg 3): one database that several Batch service replicas (and
`fashion batch run` processes) share, on as many machines; FASHION_BATCH_DATABASE_URL names it.

- One connection per process, its session the process's identity: at connect the process becomes
  a worker (a number from a sequence) and holds the session-level advisory lock of that number
  for as long as it lives. Job locks are session-level advisory locks too
  (pg_try_advisory_lock(JOB_LOCKS, hash of the job id)). PostgreSQL releases them when the session
  ends: when the process dies (its socket closes; on a machine that vanished, when TCP keepalives
  give up, about a minute), so a replica takes a dead one's jobs and files over at once. Advisory
  locks need a direct connection or a session-mode pooler (not PgBouncer's transaction mode).
- Claims: UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED): replicas claiming a job's pending
  rows at the same time take different ones without waiting for each other. A worker is dead when
  its advisory lock can be taken (take_over); its rows change hands then.
- Plans read the job's row FOR SHARE: set_ending (an UPDATE of that row) waits for plans in
  progress, and no plan begins after it, so a runner that recorded the job's end state knows every
  transfer in flight.
- Durable commits use the server's synchronous_commit (on unless the server turned it off: then
  on for them); the others are committed with synchronous_commit=off.
- If the connection is lost, every call raises StoreUnavailable while this process still holds a
  job or helps with one (its runs stop where they are: a takeover finishes their transfers); once
  none is, the next call connects again, as a new worker. Before each file it moves, a run asks
  check_session, which notices a session the server ended (a terminated backend, a restart: the
  server's last words wait unread on the socket) without a query, so a run never moves a file
  another replica may be taking over.
- A server that stops answering (hung) is given up: when a call has waited `connect_timeout` (the
  URL's, else CONNECT_TIMEOUT_S) and a new connection is not answered within as long either, the
  connection is shut down (StoreUnavailable, "did not answer"), never waited on forever; a server
  that answers new connections is only busy, and its call goes on.
- What the database cannot do now (a full disk, out of memory, too many connections, a shutdown, a
  read-only standby) is StoreUnavailable too, with the server's reason: the runs stop and resume
  later; it never fails a job.
- Schema: created or upgraded at connect, in one transaction under an advisory lock (replicas
  starting together wait for each other); a database of a newer release is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from services.batch.store import CLASSIFIED_FILES_TABLE, JobLock, JobStore, Row, StoreUnavailable

log = logging.getLogger(__name__)

# Advisory lock spaces (the two-key form: class, key). "bat" + 0..3.
JOB_LOCKS = 0x62617400
WORKER_LOCKS = 0x62617401
SCHEMA_LOCK = 0x62617402
SERIAL_LOCK = 0x62617403
CONNECT_TIMEOUT_S = 10
WATCH_EVERY_S = 0.5  # how often the watchdog looks at the call waiting for the server
SESSION_CHECK_WAIT_S = 1.0  # check_session waits this long at most for a call in progress
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # any live server answers it at once, before any login
# What the server cannot do now rather than what was asked wrongly: connection (08), insufficient
# resources (53: disk full, out of memory, too many connections), operator intervention (57: shutdown,
# cancel), system errors (58: I/O), and a read-only transaction (25006: a standby after a failover).
UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
UNAVAILABLE_STATES = ("25006",)
# Client and server notice a peer that vanished (no FIN: a machine lost) within about a minute.
KEEPALIVES = {"keepalives": "1", "keepalives_idle": "20", "keepalives_interval": "10", "keepalives_count": "3"}
SERVER_KEEPALIVES = ("SET tcp_keepalives_idle = 20", "SET tcp_keepalives_interval = 10",
                     "SET tcp_keepalives_count = 3")

SCHEMA_VERSION = 1
MIGRATIONS = {
    1: """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    trigger TEXT NOT NULL,
    input_dir TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    mode TEXT NOT NULL,
    min_confidence DOUBLE PRECISION,
    recursive INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    stamp TEXT UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
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
    confidence DOUBLE PRECISION,
    destination TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    finished_at DOUBLE PRECISION,
    worker TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS files_claimed_source ON files(source) WHERE state != 'done';
CREATE UNIQUE INDEX IF NOT EXISTS files_reserved_destination ON files(destination) WHERE state = 'moving';
CREATE INDEX IF NOT EXISTS files_errors ON files(finished_at) WHERE outcome = 'failed';
CREATE INDEX IF NOT EXISTS files_open ON files(job_id, seq) WHERE state != 'done';
CREATE SEQUENCE IF NOT EXISTS batch_workers AS INTEGER CYCLE;
""",
}


def lock_key(job_id: str) -> int:
    """A job's advisory lock key: 32 bits of its id's hash (two jobs sharing one only wait for each other)."""
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=4).digest(), "big", signed=True)


def safe_target(url: str) -> str:
    """user@host:port/database of a connection URL: what logs and errors may show (never the password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable PostgreSQL URL"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"{info.get('user') or '(default user)'}@{host}:{port}/{info.get('dbname') or '(default database)'}"


def _scrubbed(text: str, url: str) -> str:
    """`text` without the URL's password: as parsed, and as written between "user:" and the last "@" (a URL
    that does not parse, e.g. with a raw % or a space in the password, is quoted raw in psycopg's errors)."""
    secrets: set[str] = set()
    with contextlib.suppress(psycopg.ProgrammingError):
        secrets.add(str(conninfo_to_dict(url).get("password") or ""))
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if ":" in userinfo:
        written = userinfo.partition(":")[2]
        secrets |= {written, urllib.parse.unquote(written)}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class AdvisoryJobLock(JobLock):
    """pg_try_advisory_lock on the store's session: released by release() or when the session ends."""

    def __init__(self, store: PostgresJobStore, job_id: str, session: int) -> None:
        self._store, self.job_id, self._session = store, job_id, session

    def release(self, finished: bool = False) -> None:
        self._store._unlock_job(self.job_id, self._session)


class _PgTx:
    """SQL with ? placeholders (the store's portable queries) on a psycopg connection."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self._conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def one(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        return self._conn.execute(self._sql(sql), args).fetchone()  # type: ignore[arg-type]

    def all(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return self._conn.execute(self._sql(sql), args).fetchall()  # type: ignore[arg-type]

    def run(self, sql: str, args: Sequence[object] = ()) -> int:
        return self._conn.execute(self._sql(sql), args).rowcount  # type: ignore[arg-type]

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        if not rows:
            return 0
        with self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)  # type: ignore[arg-type]
            return cur.rowcount


class PostgresJobStore(JobStore):
    """One connection behind a lock; any number of processes on any machines may share the database."""

    shared = True
    _conflicts = (errors.UniqueViolation, errors.DeadlockDetected)
    _share_lock = " FOR SHARE"

    def __init__(self, url: str) -> None:
        self._url = url
        self.target = safe_target(url)
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Row] | None = None
        self._session = 0
        """Which connection this is (counts reconnections): job locks of an earlier one are gone."""
        self._held: set[str] = set()
        self._working = 0
        """Runs of this process (helpers' too) that act on records of the current session."""
        self._lost = ""
        self._durable_sync = ""
        self.worker = ""
        self._answer_wait_s = float(CONNECT_TIMEOUT_S)
        with contextlib.suppress(psycopg.ProgrammingError, ValueError):
            self._answer_wait_s = float(conninfo_to_dict(url).get("connect_timeout") or CONNECT_TIMEOUT_S)
        self._asked_at: float | None = None
        """When the call now waiting for the server began (None: none waits)."""
        self._asking: psycopg.Connection[Row] | None = None
        """The connection that call waits on."""
        self._hung = ""
        """Why the watchdog gave the connection up (the server did not answer)."""
        self._slow_call: float | None = None
        """The call in progress (its _asked_at) that check_session found slow: it does not wait for it again."""
        self._poll = select.poll()
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None
        with self._lock:
            self._connect()

    # --- the connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        params: dict[str, Any] = {"connect_timeout": str(CONNECT_TIMEOUT_S), "application_name": "fashion-batch",
                                  **KEEPALIVES}
        try:
            given = conninfo_to_dict(self._url)
        except psycopg.ProgrammingError as exc:
            raise StoreUnavailable(f"FASHION_BATCH_DATABASE_URL is not a usable PostgreSQL URL (characters such as "
                                   f"%, @, /, : and spaces in the user name and password must be percent-encoded): "
                                   f"{_scrubbed(str(exc), self._url)}") from None
        conninfo = make_conninfo(self._url, **{k: v for k, v in params.items() if k not in given})
        try:
            conn = psycopg.connect(conninfo, autocommit=True, row_factory=dict_row)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to the jobs database {self.target}: "
                                   f"{_scrubbed(str(exc), self._url).strip()}") from None
        self._hung = ""
        try:
            with self._waiting_on(conn):
                for statement in SERVER_KEEPALIVES:
                    conn.execute(statement)  # type: ignore[arg-type]
                setting = conn.execute("SELECT current_setting('synchronous_commit') AS s").fetchone()
                self._durable_sync = "on" if setting and setting["s"] == "off" else ""
                _migrate(conn)
                worker = self._become_worker(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot use the jobs database {self.target}: "
                                   f"{self._hung or _scrubbed(str(exc), self._url).strip()}") from None
        self._conn, self.worker, self._lost = conn, worker, ""
        self._session += 1
        self._poll = select.poll()
        self._poll.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI)
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="jobs-database-watchdog", daemon=True)
            self._watchdog.start()
        log.info("Jobs database: PostgreSQL %s, this process is worker %s (%s, pid %d)", self.target, worker,
                 socket.gethostname(), os.getpid())

    @staticmethod
    def _become_worker(conn: psycopg.Connection[Row]) -> str:
        """A worker number whose advisory lock this session holds from now on."""
        while True:
            row = conn.execute("SELECT nextval('batch_workers') AS n").fetchone()
            assert row is not None
            number = int(row["n"])
            if _try_lock(conn, WORKER_LOCKS, number):
                return str(number)

    def _usable(self) -> psycopg.Connection[Row]:
        """The connection; connects again after a loss once no job is held and no run works with the lost
        session's records (a run going on as a new worker would act on rows it no longer holds). Raises
        StoreUnavailable."""
        if self._conn is not None and not self._conn.closed and not self._lost:
            return self._conn
        if self._held or self._working:
            raise StoreUnavailable(self._lost or "the jobs database connection is closed")
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._connect()
        assert self._conn is not None
        return self._conn

    @contextmanager
    def _guarded(self) -> Iterator[psycopg.Connection[Row]]:
        """The connection under the lock; a lost connection becomes StoreUnavailable (and is replaced later),
        and so does what the server cannot do now (UNAVAILABLE_CLASSES: the connection is kept)."""
        with self._lock:
            conn = self._usable()  # connecting again: bounded by connect_timeout, then watched (_connect)
            try:
                with self._waiting_on(conn):
                    yield conn
            except psycopg.Error as exc:
                reason = self._hung or _one_line(_scrubbed(str(exc), self._url))
                if not (conn.broken or conn.closed):
                    state = exc.sqlstate or ""
                    if not (state[:2] in UNAVAILABLE_CLASSES or state in UNAVAILABLE_STATES):
                        raise
                    refused = f"the jobs database {self.target} cannot do this now: {reason}"
                    log.error("%s", refused)
                    raise StoreUnavailable(refused) from None
                self._lost = f"lost the connection to the jobs database {self.target}: {reason}"
                log.error("%s", self._lost)
                raise StoreUnavailable(self._lost) from None

    @contextmanager
    def _waiting_on(self, conn: psycopg.Connection[Row] | None) -> Iterator[None]:
        """A call waiting for the server on `conn`, for the watchdog (calls are one at a time: the lock)."""
        self._asking, self._asked_at = conn, time.monotonic()
        try:
            yield
        finally:
            self._asked_at = None

    def _watch(self) -> None:
        """The watchdog: a call that waited _answer_wait_s, when a new connection is not answered within as
        long either, is ended by shutting its socket down (the server is hung: its call would wait forever);
        then the server ends the session as soon as it runs again. A server that answers is only busy."""
        probed: float | None = None
        while not self._closed.wait(WATCH_EVERY_S):
            asked, conn = self._asked_at, self._asking
            if asked is None or conn is None or asked == probed or time.monotonic() - asked < self._answer_wait_s:
                continue
            probed = asked
            if _answers(conn, self._answer_wait_s):
                continue
            waited = time.monotonic() - asked
            if self._asked_at != asked:
                continue  # it was answered meanwhile
            self._hung = (f"the server did not answer for {waited:.0f} s, nor a new connection within "
                          f"{self._answer_wait_s:.0f} s (hung or unreachable): the connection was given up")
            log.error("Jobs database %s: %s", self.target, self._hung)
            with contextlib.suppress(OSError, psycopg.Error), socket.socket(fileno=os.dup(conn.pgconn.socket)) as ours:
                ours.shutdown(socket.SHUT_RDWR)

    def check_session(self) -> None:
        # After the call in progress, if any: a call on a lost connection fails at once (and says so), and
        # its answer is never mistaken for the server's last words. A call still running after
        # SESSION_CHECK_WAIT_S is a live server's: checks skip it rather than wait for it at every file.
        asked = self._asked_at
        if asked is not None and asked == self._slow_call:
            got = self._lock.acquire(blocking=False)
        elif not (got := self._lock.acquire(timeout=SESSION_CHECK_WAIT_S)):
            self._slow_call = asked
        try:
            if self._lost or self._hung:
                raise StoreUnavailable(self._lost or f"lost the connection to the jobs database {self.target}: "
                                                     f"{self._hung}")
            if not got:
                return
            if self._conn is None or self._conn.closed or self._conn.broken:
                raise StoreUnavailable(f"the connection to the jobs database {self.target} is closed")
            if self._poll.poll(0):  # unasked words from the server: its last before it ended the session
                with self._guarded() as conn:
                    conn.execute("SELECT 1")  # raises with the server's reason; passes when it was only a notice
        finally:
            if got:
                self._lock.release()

    @contextmanager
    def working(self) -> Iterator[None]:
        """While a run that holds no job lock (a helper) acts on this session's records: a lost connection
        is not replaced meanwhile (see _usable)."""
        with self._lock:
            self._working += 1
        try:
            yield
        finally:
            with self._lock:
                self._working -= 1

    @contextmanager
    def _transaction(self, durable: bool = False, serialized: bool = False) -> Iterator[_PgTx]:
        with self._guarded() as conn, conn.transaction():
            if not durable:
                conn.execute("SET LOCAL synchronous_commit = off")
            elif self._durable_sync:
                conn.execute("SET LOCAL synchronous_commit = on")
            if serialized:
                conn.execute("SELECT pg_advisory_xact_lock(%s::int4, 0)", (SERIAL_LOCK,))
            yield _PgTx(conn)

    @contextmanager
    def _reading(self) -> Iterator[_PgTx]:
        with self._guarded() as conn:
            yield _PgTx(conn)

    def describe(self) -> str:
        return f"PostgreSQL {self.target} (worker {self.worker})"

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the session's advisory locks end with it
            self._conn = None
            self._held.clear()

    # --- locks, claims, takeover -------------------------------------------------------------------

    def lock_job(self, job_id: str) -> AdvisoryJobLock | None:
        with self._guarded() as conn:
            if job_id in self._held:  # advisory locks are reentrant within a session: one holder here too
                return None
            if not _try_lock(conn, JOB_LOCKS, lock_key(job_id)):
                return None
            self._held.add(job_id)
            return AdvisoryJobLock(self, job_id, self._session)

    def _unlock_job(self, job_id: str, session: int) -> None:
        with self._lock:
            self._held.discard(job_id)
            conn = self._conn
            if session != self._session or conn is None or conn.closed or conn.broken or self._lost:
                return  # that session is over: so is the lock
            try:
                with self._waiting_on(conn):
                    _unlock(conn, JOB_LOCKS, lock_key(job_id))
            except psycopg.Error as exc:
                log.warning("Could not release the lock of job %s: %s", job_id, _scrubbed(str(exc), self._url))

    def runnable(self, job_ids: Collection[str]) -> set[str]:
        """The unfinished jobs whose advisory lock no session of this database holds, read from pg_locks
        (nothing taken: a try-and-release could make a replica starting the job at that moment miss it).
        The states are read after the locks: a job that ended meanwhile (its lock released) is left out."""
        if not job_ids:
            return set()
        with self._reading() as tx:  # the two-key form: classid key 1, objid key 2 (as unsigned), objsubid 2
            held = {int(r["objid"]) for r in tx.all(
                "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND classid = ?"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", (JOB_LOCKS,))}
            free = [job_id for job_id in job_ids if lock_key(job_id) & 0xFFFFFFFF not in held]
        return set(free) & set(self.unfinished_ids()) if free else set()

    def _claim(self, tx: Any, job_id: str, limit: int) -> list[Row]:
        # A CTE that locks rows is evaluated exactly once (a subquery in FROM may be run again per row).
        return tx.all(
            "WITH c AS (SELECT seq FROM files WHERE job_id = ? AND state = 'pending' AND state != 'done'"
            " AND worker = '' ORDER BY seq LIMIT ? FOR UPDATE SKIP LOCKED)"
            " UPDATE files AS f SET worker = ? FROM c WHERE f.job_id = ? AND f.seq = c.seq RETURNING f.*",
            (job_id, limit, self.worker, job_id))

    def take_over(self, job_id: str) -> int:
        """A worker is dead when its advisory lock can be taken; taken, it is let go again at once."""
        with self._guarded() as conn:
            holders = conn.execute(
                "SELECT DISTINCT worker FROM files WHERE job_id = %s AND state != 'done' AND worker != ''"
                " AND worker != %s", (job_id, self.worker)).fetchall()
            dead = []
            for row in holders:
                name = row["worker"]
                if not re.fullmatch(r"\d+", name):
                    dead.append(name)  # not a worker of this database's (a copied SQLite row): nobody's
                    continue
                if _try_lock(conn, WORKER_LOCKS, int(name)):
                    dead.append(name)
            try:
                if not dead:
                    return 0
                with conn.transaction():
                    cur = conn.execute(
                        "UPDATE files SET worker = CASE WHEN state = 'moving' THEN %s ELSE '' END"
                        " WHERE job_id = %s AND state != 'done' AND worker = ANY(%s)", (self.worker, job_id, dead))
                    taken = cur.rowcount
            finally:
                for name in dead:
                    if name.isdigit():
                        _unlock(conn, WORKER_LOCKS, int(name))
            log.info("Job %s: took over %d files of workers that stopped (%s)", job_id, taken, ", ".join(dead))
            return taken


def _one_line(text: str) -> str:
    """A server's message on one log line (its DETAIL and HINT lines joined with "; ")."""
    return re.sub(r"\s*\n\s*", "; ", text.strip())


def _answers(conn: psycopg.Connection[Row], wait_s: float) -> bool:
    """Whether the server `conn` is connected to answers a new connection within `wait_s` (an SSLRequest,
    answered before any login, taking no connection slot)."""
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as ours:
            family, address = ours.family, ours.getpeername()
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(wait_s)
            probe.connect(address)
            probe.sendall(SSL_REQUEST)
            return bool(probe.recv(1))
    except (OSError, psycopg.Error):
        return False


def _try_lock(conn: psycopg.Connection[Row], space: int, key: int) -> bool:
    """A session-level advisory lock, if free (or already this session's)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s::int4, %s::int4) AS got", (space, key)).fetchone()
    return bool(row and row["got"])


def _unlock(conn: psycopg.Connection[Row], space: int, key: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s::int4, %s::int4)", (space, key))


def _migrate(conn: psycopg.Connection[Row]) -> None:
    """Create or upgrade the schema, once however many replicas start together."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s::int4, 0)", (SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS batch_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) AS v FROM batch_schema").fetchone()
        version = int(row["v"]) if row and row["v"] is not None else 0
        if version > SCHEMA_VERSION:
            raise errors.FeatureNotSupported(
                f"the jobs database has schema version {version}, newer than this release's {SCHEMA_VERSION}: "
                "run a release at least as new")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[number])  # type: ignore[arg-type]
        if version < SCHEMA_VERSION:
            conn.execute("DELETE FROM batch_schema")
            conn.execute("INSERT INTO batch_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        conn.execute(CLASSIFIED_FILES_TABLE)  # type: ignore[arg-type]

"""The Monitor service's SQLite file: alert state per rule, alert history, and the outbox of
notifications still to deliver. A transition (state, history entry, notifications) is one
transaction, so a crash never leaves an alert fired without its notification queued, and a
restart neither forgets a firing alert nor sends it again."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_state (
    rule TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    title TEXT NOT NULL,
    severity TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL,
    notified INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_history_rule ON alert_history (rule, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    notifier TEXT NOT NULL,
    notification TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass
class AlertRecord:
    """What the engine remembers about one rule between evaluations (and restarts)."""

    rule: str
    title: str
    severity: str
    state: str = "ok"
    """ok, pending (condition seen, not yet confirmed) or firing."""
    pending_checks: int = 0
    message: str = ""
    value: float = 0.0
    threshold: float = 0.0
    started_at: float | None = None
    updated_at: float | None = None
    resolved_at: float | None = None
    notified: bool = False
    """Whether this incident's fired notification was queued (False while the cooldown holds it)."""
    last_notified_at: float | None = None
    """When the rule's last fired notification was queued: the start of its cooldown."""
    fired_event_id: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AlertRecord:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    rule: str
    title: str
    severity: str
    kind: str
    message: str
    at: float
    notified: bool


@dataclass(frozen=True)
class OutboxItem:
    id: int
    notifier: str
    notification: str
    """The Notification as JSON."""
    attempts: int
    next_attempt_at: float
    created_at: float
    last_error: str


class MonitorStore:
    """Thread-safe access to the SQLite file (one connection, one lock; every call is short)."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        if read_only:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    # --- meta ---
    def meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def check_writable(self) -> None:
        """Write one row (when this file was last opened): raises what a write raises here (a read-only
        file, a full disk), which opening alone does not."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_opened_at', ?)", (repr(time.time()),))

    def meta_setdefault(self, key: str, value: str) -> str:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    # --- alert state and history ---
    def records(self) -> dict[str, AlertRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM alert_state").fetchall()
        records = [AlertRecord.from_json(r[0]) for r in rows]
        return {r.rule: r for r in records}

    def save(self, record: AlertRecord, event: HistoryEntry | None = None,
             notifications: Sequence[tuple[str, str]] = (), mark_notified: int | None = None) -> int | None:
        """Write a rule's record; with it, atomically: a history entry, notifications to queue
        (notifier name, notification JSON), and/or an earlier history entry to mark notified.
        Returns the new history entry's id."""
        now = time.time()
        event_id = None
        with self._transaction() as db:
            if event is not None:
                cur = db.execute(
                    "INSERT INTO alert_history (rule, title, severity, kind, message, at, notified)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (event.rule, event.title, event.severity, event.kind, event.message, event.at,
                     int(event.notified)))
                event_id = cur.lastrowid
                if event.kind == "fired":
                    record.fired_event_id = event_id
            if mark_notified is not None:
                db.execute("UPDATE alert_history SET notified = 1 WHERE id = ?", (mark_notified,))
            db.execute("INSERT INTO alert_state (rule, record) VALUES (?, ?)"
                       " ON CONFLICT (rule) DO UPDATE SET record = excluded.record",
                       (record.rule, record.to_json()))
            db.executemany("INSERT INTO outbox (notifier, notification, next_attempt_at, created_at)"
                           " VALUES (?, ?, ?, ?)", [(n, text, now, now) for n, text in notifications])
        return event_id

    def enqueue(self, notifications: Sequence[tuple[str, str]]) -> None:
        """Queue notifications that belong to no alert (the scheduled report)."""
        now = time.time()
        with self._transaction() as db:
            db.executemany("INSERT INTO outbox (notifier, notification, next_attempt_at, created_at)"
                           " VALUES (?, ?, ?, ?)", [(n, text, now, now) for n, text in notifications])

    def history(self, limit: int, rule: str = "") -> list[HistoryEntry]:
        query = "SELECT id, rule, title, severity, kind, message, at, notified FROM alert_history"
        args: tuple[object, ...] = ()
        if rule:
            query += " WHERE rule = ?"
            args = (rule,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [HistoryEntry(*row[:7], notified=bool(row[7])) for row in rows]

    # --- outbox ---
    def outbox_heads(self) -> list[OutboxItem]:
        """The oldest queued notification of each notifier (each is delivered strictly in order)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, notifier, notification, attempts, next_attempt_at, created_at, last_error FROM outbox"
                " WHERE id IN (SELECT MIN(id) FROM outbox GROUP BY notifier) ORDER BY id").fetchall()
        return [OutboxItem(*row) for row in rows]

    def outbox_size(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def outbox_done(self, item_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def outbox_retry(self, item_id: int, next_attempt_at: float, error: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                       (next_attempt_at, error, item_id))

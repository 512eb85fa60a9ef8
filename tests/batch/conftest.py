"""Fixtures of the Batch tests: Batch service processes on real ports with a temporary data root,
against the shared Inference service (fixture model) or their own; folders of real images.

The jobs database is a parameter (`jobs_database`, and the module-scoped `batch_home`): the tests
that take it run twice, on the SQLite file under the data root ("sqlite") and on a fresh database
of one PostgreSQL server per session ("postgres", tests/postgres.py; skipped with the reason when
PostgreSQL is not installed)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from services.batch.mover import category_folder
from services.inference.imaging import Preprocessor
from tests.images import encode, fashion_images
from tests.postgres import PostgresServer, missing_reason
from tests.support import LABELS, ServiceProcess, free_port, linear_expected, start_service

PRE = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))  # the fixture model's manifest
MIN_CONFIDENCE = 0.3  # the fixture model's manifest


STORES = ("sqlite", "postgres")
_connections: dict[str, psycopg.Connection[Any]] = {}
"""The tests' own connections to PostgreSQL jobs databases, by URL (closed with the server)."""


@dataclass
class BatchHome:
    """A working folder: data root, results, logs, as a Batch service process or the CLI sees them; and
    its jobs database: the SQLite file under the data root, or a PostgreSQL database (`database_url`)."""

    workdir: Path
    database_url: str | None = None

    @property
    def store(self) -> str:
        return "postgres" if self.database_url else "sqlite"

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query (? placeholders) on the jobs database, as tuples."""
        if self.database_url:
            conn = _connections.get(self.database_url)
            if conn is None:
                conn = _connections[self.database_url] = psycopg.connect(self.database_url, autocommit=True)
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), args).fetchall()]  # type: ignore
        with sqlite3.connect(self.data / ".batch" / "jobs.db", timeout=30) as db:
            return db.execute(sql, args).fetchall()

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def output(self) -> Path:
        return self.data / "processed_batches"

    def results(self) -> Path:
        return self.workdir / "results" / "batch_results"

    def env(self, inference_address: str, **extra: str) -> dict[str, str]:
        return {
            "FASHION_DATA_ROOT": "data", "FASHION_RESULTS_DIR": "results", "FASHION_LOG_DIR": "logs",
            "FASHION_INFERENCE_ADDRESS": inference_address, "FASHION_BATCH_SCHEDULE": "",
            "FASHION_BATCH_METRICS_PORT": "0", "FASHION_BATCH_FSYNC": "true", "OTEL_SDK_DISABLED": "true",
            "FASHION_BATCH_RETRY_INITIAL_S": "0.2", "FASHION_BATCH_RETRY_MAX_S": "1",
            "PYTHONFAULTHANDLER": "1",
            **({"FASHION_BATCH_DATABASE_URL": self.database_url} if self.database_url else {}), **extra,
        }

    def start(self, inference_address: str, unprivileged: bool = False, wait: bool = True,
              **extra: str) -> ServiceProcess:
        """A Batch service on a free port, SERVING unless not `wait`ed for; `unprivileged`: file permissions
        apply to it even in CI (which runs as root)."""
        port = free_port()
        env = self.env(inference_address, FASHION_BATCH_HOST="127.0.0.1", FASHION_BATCH_PORT=str(port), **extra)
        svc = start_service("services.batch", self.workdir, env, f"127.0.0.1:{port}", unprivileged)
        if not wait:
            return svc
        try:
            svc.wait_serving(timeout=60)
        except BaseException:
            svc.kill()
            raise
        return svc


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_images(folder: Path, n: int, start: int = 0, prefix: str = "item") -> dict[str, bytes]:
    """n Fashion-MNIST PNGs named <prefix>_<i>.png; returns name -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    x, _ = fashion_images(n, start)
    files = {f"{prefix}_{start + i:04d}.png": encode(img) for i, img in enumerate(x)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def expected_sorting(wb: np.ndarray, files: dict[str, bytes], min_confidence: float = MIN_CONFIDENCE
                     ) -> dict[str, tuple[str, float, str]]:
    """name -> (label, confidence, folder) the fixture model must produce, computed from its weights."""
    names = sorted(files)
    probs = linear_expected(wb, np.stack([PRE(files[n]) for n in names]))
    out = {}
    for name, p in zip(names, probs, strict=True):
        best = int(np.argmax(p))
        conf = float(p[best])
        folder = "_uncertain" if conf < min_confidence else category_folder(LABELS[best])
        out[name] = (LABELS[best], conf, folder)
    return out


def files_under(root: Path) -> dict[str, list[Path]]:
    """Every file or link under `root` by name (the jobs database folder .batch/ left out)."""
    found: dict[str, list[Path]] = {}
    for p in root.rglob("*"):
        if (p.is_file() or p.is_symlink()) and p.relative_to(root).parts[0] != ".batch":
            found.setdefault(p.name, []).append(p)
    return found


def contents(root: Path, skip: tuple[str, ...] = (".batch",)) -> dict[str, str]:
    """Every entry under `root` by relative path: a file's SHA-256, a link's target, "dir" for folders
    (the folders named in `skip` left out): a snapshot to compare byte for byte."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):  # links are listed, never followed
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d in skip)]
        for name in [*dirs, *files]:
            p = Path(folder) / name
            found[str(p.relative_to(root))] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                                               else digest(p.read_bytes()))
    return dict(sorted(found.items()))


def regular_files_by_digest(root: Path) -> dict[str, list[str]]:
    """Digest -> the regular files under `root` with those bytes (jobs database left out)."""
    by_digest: dict[str, list[str]] = {}
    for rel, what in contents(root).items():
        if what != "dir" and not what.startswith("-> "):
            by_digest.setdefault(what, []).append(rel)
    return by_digest


def assert_all_sorted_once(home: BatchHome, inbox: Path, images: dict[str, bytes], job: pb.Job,
                           output: Path | None = None) -> None:
    """Every image in exactly one place under the job's output folder (`output`, else home.output), bytes
    intact; reports complete."""
    output = output or home.output
    assert not [p for p in inbox.iterdir() if p.name in images], "images left in the inbox"
    found = files_under(home.data)
    for name, data in images.items():
        places = found.get(name, [])
        assert len(places) == 1 and places[0].is_relative_to(output), (name, places)
        assert places[0].read_bytes() == data, name
    assert not [p for p in home.data.rglob(".batch-*.part")], "staging files left behind"
    assert sum(len(v) for v in files_under(output).values()) == len(images)
    rows = read_csv(home.workdir / job.results_csv)
    assert sorted(r["filename"] for r in rows) == sorted(images)  # complete, no duplicates
    summary = read_summary(home.workdir / job.summary_json)
    assert summary["total_processed"] == len(images) and summary["failed"] == 0
    assert summary["successful"] + summary["uncertain"] == len(images)  # type: ignore[operator]
    assert (job.processed, job.failed, job.total) == (len(images), 0, len(images))
    states = home.query("SELECT state, COUNT(*) FROM files WHERE job_id = ? GROUP BY state", (job.job_id,))
    assert states == [("done", len(images))]
    recorded = home.query("SELECT source, destination FROM files WHERE job_id = ?", (job.job_id,))
    assert sorted(Path(s).name for s, _ in recorded) == sorted(images)  # the records agree with the folders
    for source, destination in recorded:
        assert (home.data / destination).read_bytes() == images[Path(source).name], (source, destination)


@contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A size-limited tmpfs mounted at `path` (created), unmounted at exit: another filesystem, or one
    that fills up. Skips the test where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its filesystem is full; returns the file (delete it to free the space)."""
    filler = folder / ".filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["filename", "category", "confidence", "status", "timestamp"]
        return list(reader)


def read_summary(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))


def wait_for(client: BatchClient, job_id: str, condition: Callable[[pb.Job], bool], timeout: float = 60,
             what: str = "") -> pb.Job:
    deadline = time.monotonic() + timeout
    job = client.get(job_id)
    while not condition(job):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'the job'}: {job}")
        time.sleep(0.05)
        job = client.get(job_id)
    return job


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (skips with the reason where it cannot run)."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        for conn in _connections.values():
            conn.close()
        _connections.clear()
        server.stop()


def _database(request: pytest.FixtureRequest, store: str) -> str | None:
    """A fresh jobs database for `store`: None for SQLite (the file under the data root), else a URL."""
    if store == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture(params=STORES)
def jobs_database(request: pytest.FixtureRequest) -> str | None:
    """The test runs on each store: None (SQLite), then a fresh PostgreSQL database's URL."""
    return _database(request, request.param)


@pytest.fixture
def postgres_database(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database's URL (tests of PostgreSQL only)."""
    url = _database(request, "postgres")
    assert url is not None
    return url


@pytest.fixture(scope="module", params=STORES)
def batch_home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BatchHome:
    """The module's working folder, once per store."""
    return BatchHome(tmp_path_factory.mktemp("batch"), _database(request, request.param))


@pytest.fixture(scope="module")
def batch_server(batch_home: BatchHome, inference_server: ServiceProcess) -> Iterator[ServiceProcess]:
    """One Batch service (fsync on, like production) on the shared Inference service, for the module."""
    svc = batch_home.start(inference_server.address)
    try:
        yield svc
    finally:
        svc.terminate()

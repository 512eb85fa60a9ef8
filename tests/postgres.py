"""A throwaway PostgreSQL server for the tests of the PostgreSQL job store: Debian's binaries
(`apt-get install postgresql`; `make test-tools` installs them), run as an unprivileged user
(PostgreSQL refuses to run as root) in a temporary folder, on a free loopback port with its unix
socket in that folder, password authentication over TCP. One server per test session; a fresh
database per test (CREATE DATABASE is a file copy of template1).

Durability is off (fsync=off) unless a test asks for it: most tests kill Batch service processes, never
the database server; those that stop, hang or restart the server (tests/batch/test_postgres_faults.py)
run their own one with fsync on (`PostgresServer(durable=True)`).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support import changed_command, free_port

USER = "fashion"
PASSWORD = "s3cret-pg-test-password"
"""The test role's password: what tests check never appears in a log."""


def binaries() -> Path | None:
    """The folder of initdb, pg_ctl and postgres: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def missing_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql, or `make test-tools`)"
    if os.geteuid() == 0 and _unprivileged_user() is None:
        return "running as root without an unprivileged user (postgres or nobody) to run PostgreSQL as"
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


class PostgresServer:
    """initdb + postgres in a temporary folder; `url(database)` connects as the test role."""

    def __init__(self, folder: Path | None = None, durable: bool = False, max_connections: int = 200) -> None:
        """`folder`: where the server keeps everything (an empty folder, e.g. a small tmpfs), else a new
        temporary one; `durable`: fsync on (a server that is stopped and restarted keeps every commit)."""
        bindir = binaries()
        assert bindir is not None, missing_reason()
        self.bindir = bindir
        self.port = free_port()
        self.folder = folder if folder is not None else Path(tempfile.mkdtemp(prefix="fashion-pg-"))
        self.options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                        f"-c max_connections={max_connections} -c shared_buffers=32MB -c deadlock_timeout=200ms "
                        + ("" if durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._names = itertools.count(1)
        self._as = _unprivileged_user() if os.geteuid() == 0 else None
        if self._as is not None:
            os.chown(self.folder, self._as.pw_uid, self._as.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        user = None if self._as is None else (self._as.pw_uid, self._as.pw_gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        return subprocess.run(changed_command(args, user=user), cwd=self.folder, env=env, capture_output=True,
                              text=True, timeout=120)

    def start(self) -> None:
        pwfile = self.folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as is not None:
            os.chown(pwfile, self._as.pw_uid, self._as.pw_gid)
        done = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                         "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
                         "--no-sync")
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        self.start_again()

    def start_again(self) -> None:
        """Start the server on its data folder (after stop_server)."""
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                         "-o", self.options, "start")
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {done.stdout}{done.stderr}\n{self.output()}")

    def stop_server(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast (sessions terminated, a clean shutdown) or immediate (a crash: every process
        quits at once, the next start recovers from the write-ahead log); the data folder stays."""
        done = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not stop: {done.stdout}{done.stderr}")

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, background workers): what a hung server stops."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *(int(pid) for pid in children)]

    def pause(self) -> list[int]:
        """Hang the server: SIGSTOP to the postmaster and every child (connections stay open, nothing answers).
        Returns the processes stopped, for resume()."""
        stopped = self.processes()
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return stopped

    @staticmethod
    def resume(stopped: list[int]) -> None:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"batch_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

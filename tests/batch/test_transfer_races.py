"""Transfers racing the uploads they sort, through `fashion batch run` (as root, like cron and CI):
a copy never turns an uploader's setuid, setgid or sticky bits into a file owned by the service's
user; a move never removes a source name that, while its file was copied to another filesystem or
linked, came to hold another file (a re-upload renamed over it) or changed (still being written).
The run stops itself at the exact step (FASHION_BATCH_STOP_AT, SIGSTOP) while the test changes the
source, then goes on (SIGCONT). On SQLite: the filesystem is what matters here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.batch.conftest import (
    BatchHome,
    digest,
    expected_sorting,
    files_under,
    read_summary,
    regular_files_by_digest,
    tmpfs,
    write_images,
)
from tests.support import ServiceProcess

FASHION = str(Path(sys.executable).with_name("fashion"))
NOBODY = 65534
pytestmark = pytest.mark.timeout(180)


def batch_run(home: BatchHome, inference: ServiceProcess, *args: str, stop_at: str = "",
              meanwhile: Callable[[], None] = lambda: None) -> dict[str, object]:
    """`fashion batch run inbox --json ARGS`; with `stop_at`, the run stops at that step, `meanwhile` runs,
    then the run goes on. Returns the job as the command printed it."""
    env = {**os.environ, **home.env(inference.address)}
    if stop_at:
        env["FASHION_BATCH_STOP_AT"] = stop_at
    out, err = home.workdir / "run.out", home.workdir / "run.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([FASHION, "batch", "run", "inbox", "--json", *args], cwd=home.workdir, env=env,
                                stdout=stdout, stderr=stderr)
    try:
        if stop_at:
            _, status = os.waitpid(proc.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                proc.returncode = os.waitstatus_to_exitcode(status)
                raise AssertionError(f"the run ended before the step {stop_at!r}: {err.read_text()}")
            try:
                meanwhile()
            finally:
                os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=90) == 0, err.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    return json.loads(out.read_text())


def log_of(home: BatchHome, job: dict[str, object]) -> str:
    return (home.workdir / str(job["log_file"])).read_text(encoding="utf-8")


def errors_of(home: BatchHome, job: dict[str, object]) -> list[str]:
    return [e["error"] for e in read_summary(home.workdir / str(job["summary_json"]))["errors"]]  # type: ignore


def no_staging_left(home: BatchHome) -> bool:
    return not [p for p in home.data.rglob(".batch-*")]


# --- setuid, setgid, sticky ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["copy", "move across filesystems"])
def test_a_copy_keeps_the_permission_bits_and_never_setuid_setgid_or_sticky(
        tmp_path: Path, inference_server: ServiceProcess, mode: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the uploads are given to nobody, the copies are root's")
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    images = write_images(inbox, 4)
    modes = dict(zip(sorted(images), [0o4755, 0o2755, 0o1777, 0o640], strict=True))
    for name, bits in modes.items():
        os.chown(inbox / name, NOBODY, NOBODY)
        os.chmod(inbox / name, bits)
    with contextlib.ExitStack() as stack:
        if mode != "copy":  # a move to another filesystem copies the file too
            stack.enter_context(tmpfs(home.output))
        job = batch_run(home, inference_server, *(["--copy"] if mode == "copy" else []))
        assert job["state"] == "succeeded" and job["failed"] == 0, job
        found = files_under(home.output)
        for name, bits in modes.items():
            [copied] = found[name]
            st = copied.lstat()
            assert copied.read_bytes() == images[name]
            assert st.st_uid == 0  # the service's own file: a setuid bit here would run as root
            assert stat.S_IMODE(st.st_mode) == bits & 0o777, (name, oct(st.st_mode))


# --- re-uploads and writes while a file is transferred -----------------------------------------------------

@pytest.mark.parametrize("step", ["staged", "copied"])
def test_a_file_reuploaded_while_it_is_copied_to_another_filesystem_stays_in_the_inbox(
        tmp_path: Path, inference_server: ServiceProcess, step: str) -> None:
    """The copy is of the file classified; the new upload under its name is left for the next run."""
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    [(name, first)] = write_images(inbox, 1).items()
    [second] = write_images(tmp_path / "later", 1, start=40).values()  # another picture

    def reupload() -> None:  # as rsync and most upload servers do: a temporary file renamed over the name
        (inbox / ".upload.tmp").write_bytes(second)
        (inbox / ".upload.tmp").rename(inbox / name)

    with tmpfs(home.output):
        job = batch_run(home, inference_server, stop_at=step, meanwhile=reupload)
        assert job["state"] == "succeeded" and job["failed"] == 0, job
        assert (inbox / name).read_bytes() == second
        found = regular_files_by_digest(home.data)
        assert len(found[digest(first)]) == 1 and found[digest(first)][0].startswith("processed_batches/")
        assert found[digest(second)] == [f"inbox/{name}"]
        assert "✓ Moved to: data/processed_batches/" in log_of(home, job)
        assert no_staging_left(home)


def test_a_file_reuploaded_while_it_is_linked_on_the_same_filesystem_stays_in_the_inbox(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    [(name, first)] = write_images(inbox, 1).items()
    second = b"the new upload " + first

    def reupload() -> None:
        (inbox / ".upload.tmp").write_bytes(second)
        (inbox / ".upload.tmp").rename(inbox / name)

    job = batch_run(home, inference_server, stop_at="linked", meanwhile=reupload)
    assert job["state"] == "succeeded" and job["failed"] == 0, job
    assert (inbox / name).read_bytes() == second
    found = regular_files_by_digest(home.data)
    assert len(found[digest(first)]) == 1 and found[digest(first)][0].startswith("processed_batches/")
    assert found[digest(second)] == [f"inbox/{name}"]


@pytest.mark.parametrize("step", ["staged", "copied"])
@pytest.mark.parametrize("change", ["appended", "rewritten with its size and time kept"])
def test_a_file_written_while_it_is_copied_to_another_filesystem_is_left_whole_for_the_next_run(
        tmp_path: Path, inference_server: ServiceProcess, step: str, change: str) -> None:
    """A copy taken while the file changed is stale: it goes, the source stays, and the file fails with the
    reason; the next run moves it whole."""
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    [(name, start)] = write_images(inbox, 1).items()
    source = inbox / name
    if change == "appended":  # the uploader still writing
        whole = start + b"\0" * 50_000
    else:  # in place, then the old modification time set again (as `cp -p` over the file does); no longer
        whole = bytes(reversed(start))  # a picture: the next run moves it to _failed/

    def write() -> None:
        before = source.stat()
        with open(source, "r+b") as f:
            f.write(whole)
        if change != "appended":
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert (source.stat().st_size, source.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    with tmpfs(home.output):
        job = batch_run(home, inference_server, stop_at=step, meanwhile=write)
        assert source.read_bytes() == whole, "the file being written was removed or cut"
        assert not [p for p, places in files_under(home.output).items() if places], "a stale copy was kept"
        assert no_staging_left(home)
        assert job["state"] == "succeeded" and job["failed"] == 1, job
        [error] = errors_of(home, job)
        assert "it changed while it was being copied" in error, error
        assert "✗ Left in place: data/inbox/" in log_of(home, job)

        again = batch_run(home, inference_server)  # written by now: the next run moves it whole
        assert again["state"] == "succeeded" and "✓ Moved to: data/processed_batches/" in log_of(home, again)
        assert not source.exists()
        [(moved, places)] = files_under(home.output).items()
        assert moved == name and places[0].read_bytes() == whole


# --- replaced or rewritten after it was classified -------------------------------------------------------

def pictures_filed_apart(folder: Path, wb: np.ndarray) -> tuple[bytes, bytes, str, str]:
    """Two pictures the fixture model files in different folders: their bytes, then their folders."""
    pool = write_images(folder, 20)
    sorting = expected_sorting(wb, pool)
    first = sorted(pool)[0]
    second = next(n for n in sorted(pool) if sorting[n][2] != sorting[first][2])
    return pool[first], pool[second], sorting[first][2], sorting[second][2]


def crashed_run(home: BatchHome, inference: ServiceProcess, failpoint: str) -> None:
    """`fashion batch run inbox`, killed (SIGKILL) at the failpoint."""
    env = {**os.environ, **home.env(inference.address), "FASHION_BATCH_FAILPOINT": failpoint}
    run = subprocess.run([FASHION, "batch", "run", "inbox"], cwd=home.workdir, env=env, capture_output=True,
                         text=True, timeout=90)
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr


def filed_in(home: BatchHome, data: bytes) -> list[str]:
    """The folders (relative to the output) that hold a file with these bytes."""
    return [str(Path(p).parent.relative_to("processed_batches"))
            for p in regular_files_by_digest(home.data).get(digest(data), []) if p.startswith("processed_batches/")]


@pytest.mark.parametrize("mode", ["move", "move across filesystems", "copy"])
@pytest.mark.parametrize("change", ["re-uploaded", "rewritten in place"])
def test_a_file_replaced_after_it_was_classified_is_never_filed_under_the_old_verdict(
        tmp_path: Path, inference_server: ServiceProcess, linear_model: tuple[Path, np.ndarray], mode: str,
        change: str) -> None:
    """Between the read for classification and the move, the name came to hold another picture: it stays in
    the inbox with the reason, and the next run files it by its own verdict."""
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    first, second, first_folder, second_folder = pictures_filed_apart(tmp_path / "pool", linear_model[1])
    (inbox / "photo.png").parent.mkdir(parents=True)
    (inbox / "photo.png").write_bytes(first)

    def replace() -> None:
        if change == "re-uploaded":  # a temporary file renamed over the name (a new inode)
            (inbox / ".upload.tmp").write_bytes(second)
            (inbox / ".upload.tmp").rename(inbox / "photo.png")
        else:  # the same inode, new bytes
            with open(inbox / "photo.png", "r+b") as f:
                f.write(second)
                f.truncate()

    args = ["--copy"] if mode == "copy" else []
    with contextlib.ExitStack() as stack:
        if mode == "move across filesystems":
            stack.enter_context(tmpfs(home.output))
        job = batch_run(home, inference_server, *args, stop_at="planned", meanwhile=replace)
        assert (inbox / "photo.png").read_bytes() == second
        assert filed_in(home, second) == [], f"the new picture was filed under the verdict on {first_folder}"
        assert job["state"] == "succeeded" and job["failed"] == 1, job
        [error] = errors_of(home, job)
        assert "replaced or changed after it was classified" in error, error
        assert "✗ Left in place: data/inbox/photo.png" in log_of(home, job)
        assert no_staging_left(home)

        again = batch_run(home, inference_server, *args)
        assert again["state"] == "succeeded" and again["failed"] == 0, again
        assert filed_in(home, second) == [second_folder]
        assert (inbox / "photo.png").exists() == (mode == "copy")


@pytest.mark.parametrize("mode", ["move", "move across filesystems"])
def test_a_file_reuploaded_after_a_crash_mid_move_is_left_for_its_own_verdict(
        tmp_path: Path, inference_server: ServiceProcess, linear_model: tuple[Path, np.ndarray], mode: str,
        jobs_database: str | None) -> None:
    """Killed with the classified picture at its destination and its name not yet removed; a re-upload takes
    the name before the restart. Recovery keeps the classified picture where it went, once, and files the new
    one by its own verdict, never under the old one. On both stores: the verdict's file is in the record."""
    home = BatchHome(tmp_path, jobs_database)
    inbox = home.data / "inbox"
    first, second, first_folder, second_folder = pictures_filed_apart(tmp_path / "pool", linear_model[1])
    inbox.mkdir(parents=True)
    (inbox / "photo.png").write_bytes(first)
    with contextlib.ExitStack() as stack:
        if mode == "move across filesystems":
            stack.enter_context(tmpfs(home.output))
        crashed_run(home, inference_server, "copied" if mode != "move" else "linked")
        st = os.stat(inbox / "photo.png")  # its change time moved if it was linked
        [(identity,)] = home.query("SELECT identity FROM classified_files")
        assert identity.startswith(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:"), identity
        (inbox / ".upload.tmp").write_bytes(second)
        (inbox / ".upload.tmp").rename(inbox / "photo.png")

        recovered = batch_run(home, inference_server)
        assert recovered["state"] == "succeeded", recovered
        assert filed_in(home, first) == [first_folder]
        assert first_folder not in filed_in(home, second), "the new picture was filed under the old verdict"
        if (inbox / "photo.png").exists():  # left for the next run
            batch_run(home, inference_server)
        assert filed_in(home, first) == [first_folder] and filed_in(home, second) == [second_folder]
        assert not (inbox / "photo.png").exists() and no_staging_left(home)
        assert home.query("SELECT COUNT(*) FROM classified_files") == [(0,)]


def test_a_file_written_after_a_crash_mid_copy_is_moved_whole_without_its_stale_copy(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """Killed with the copy on the other filesystem placed and the source not yet removed; the uploader then
    appends to the file. Recovery removes the stale copy (the source is the same file, with more bytes) and
    leaves the file for the next job, which moves it whole: one copy, never the cut one beside it."""
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    [(name, start)] = write_images(inbox, 1).items()
    whole = start + b"\0" * 50_000
    with tmpfs(home.output):
        crashed_run(home, inference_server, "copied")
        assert [p.read_bytes() for p in files_under(home.output)[name]] == [start]
        with open(inbox / name, "ab") as f:
            f.write(whole[len(start):])

        recovered = batch_run(home, inference_server)  # recovers the crashed job, then runs the inbox again
        assert recovered["state"] == "succeeded", recovered
        assert [p.read_bytes() for places in files_under(home.output).values() for p in places] == [whole], \
            "the stale copy was kept"
        assert not (inbox / name).exists() and no_staging_left(home)

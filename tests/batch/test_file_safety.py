"""The Batch service's promises when the filesystem turns against it: folders swapped for symbolic
links mid-job, folders it may not write, another (read-only, full) filesystem, links planted where
recovery looks, hostile file names. Every test checks conservation byte for byte: each input file
exactly once (or, copying, its original plus at most one copy), nothing outside the data root
touched. Permission faults run the Batch service without root's right to ignore file permissions
(tests/support.py changed_command); other filesystems are size-limited tmpfs mounts. The
tests of recovery after a crash run on each jobs database (SQLite, PostgreSQL); the others, which
are about the filesystem, on SQLite."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fashion.client import BatchClient
from fashion.client.batch import FINISHED
from fashion.v1 import batch_pb2 as pb
from services.batch.paths import DataRoot
from services.batch.scanner import scan_folder
from services.batch.tree import OpenFolders
from tests.batch.conftest import (
    BatchHome,
    contents,
    digest,
    fill,
    read_csv,
    read_summary,
    regular_files_by_digest,
    remount,
    tmpfs,
    wait_for,
    write_images,
)
from tests.conftest import start_inference
from tests.support import ServiceProcess, free_port

FASHION = str(Path(sys.executable).with_name("fashion"))
pytestmark = pytest.mark.timeout(240)
SLOW = {"FASHION_BATCH_CHUNK_SIZE": "2", "FASHION_BATCH_IN_FLIGHT": "1"}  # many small steps: time to interfere


def assert_conserved(home: BatchHome, images: dict[str, bytes], copy: bool = False) -> None:
    """Each image's bytes exactly once under the data root (copying: the original in the input folder,
    where it was, plus at most one copy elsewhere); no staging file left."""
    found = regular_files_by_digest(home.data)
    for name, data in images.items():
        places = found.get(digest(data), [])
        if copy:
            originals = [p for p in places if p.split("/")[0] in ("inbox", "inbox_moved")]
            assert len(originals) == 1 and len(places) <= 2, (name, places)
        else:
            assert len(places) == 1, (name, places)
    assert not [p for p in contents(home.data) if ".batch-" in p], "staging files left behind"


def run_job(home: BatchHome, batch: ServiceProcess, folder: str, **options: object) -> pb.Job:
    with BatchClient(batch.address) as client:
        job = client.submit(folder, **options)  # type: ignore[arg-type]
        return client.wait(job.job_id, timeout_s=120)


def resume(home: BatchHome, inference: ServiceProcess, job_id: str, unprivileged: bool = False) -> pb.Job:
    """Start the Batch service again (it adopts the unfinished job) and wait for the job's end."""
    batch = home.start(inference.address, unprivileged=unprivileged)
    try:
        with BatchClient(batch.address) as client:
            return client.wait(job_id, timeout_s=60)
    finally:
        batch.terminate()


def outside_with_the_same_names(folder: Path, images: dict[str, bytes]) -> dict[str, bytes]:
    """A folder outside the data root holding other pictures under the job's own names: the files a
    swapped link would lead to. Returns name -> bytes."""
    others = write_images(folder.with_name(folder.name + "_pictures"), len(images), start=500)
    folder.mkdir()
    outsiders = {}
    for name, data in zip(sorted(os.path.basename(n) for n in images), others.values(), strict=True):
        (folder / name).write_bytes(data)
        outsiders[name] = data
    return outsiders


# --- 1, 2: folders swapped for symbolic links mid-job ---------------------------------------------------

@pytest.mark.parametrize("mode", ["move", "copy"])
@pytest.mark.parametrize("swapped", ["input folder", "subfolder", "category folder"])
def test_a_folder_swapped_for_a_link_mid_job_touches_nothing_outside(
        tmp_path: Path, inference_server: ServiceProcess, swapped: str, mode: str) -> None:
    home = BatchHome(tmp_path / "home")
    inbox = home.data / "inbox"
    if swapped == "subfolder":
        images = {**write_images(inbox / "a", 50), **write_images(inbox / "b", 50, start=50)}
    else:
        images = write_images(inbox, 100)
    elsewhere = tmp_path / "elsewhere"  # must stay byte for byte as it is
    outsiders = outside_with_the_same_names(elsewhere, images)
    (elsewhere / "Bag").mkdir()
    before = contents(elsewhere)
    batch = home.start(inference_server.address, **SLOW)
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox", mode=mode, recursive=swapped == "subfolder")
            wait_for(client, job.job_id, lambda j: j.processed >= 10, what="10 images sorted")
            if swapped == "input folder":
                inbox.rename(home.data / "inbox_moved")
                inbox.symlink_to(elsewhere, target_is_directory=True)
            elif swapped == "subfolder":
                (inbox / "b").rename(inbox / "b_moved")
                (inbox / "b").symlink_to(elsewhere, target_is_directory=True)
            else:  # the fullest destination folder: later images of the job go there too
                category = max(home.output.iterdir(), key=lambda p: len(list(p.iterdir())))
                for attempt in range(50):  # the job may make the folder again between the rename and the link
                    category.rename(home.data / f"category_moved_{attempt}")
                    try:
                        category.symlink_to(elsewhere, target_is_directory=True)
                        break
                    except FileExistsError:
                        continue
            job = client.wait(job.job_id, timeout_s=120)
    finally:
        batch.terminate()
    assert contents(elsewhere) == before, "something outside the data root was touched"
    in_root = regular_files_by_digest(home.data)
    assert not [n for n, data in outsiders.items() if digest(data) in in_root], "outside files moved in"
    assert_conserved(home, images, copy=mode == "copy")
    # The job went on with the rest; the files it could not reach failed with the reason.
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.failed > 0, job
    summary = read_summary(home.workdir / job.summary_json)
    reasons = {e["error"] for e in summary["errors"]}  # type: ignore[union-attr, index]
    # Between the rename and the new link the folder briefly does not exist: a group opened then says so.
    assert all("is now a symbolic link" in r or "does not exist" in r for r in reasons), reasons
    assert any("is now a symbolic link" in r for r in reasons), reasons
    assert len(read_csv(home.workdir / job.results_csv)) == job.processed


# --- 3: the source cannot be removed after the link or copy ---------------------------------------------

@pytest.mark.parametrize("fault", ["read-only folder", "read-only mount on another filesystem"])
def test_a_source_that_cannot_be_removed_stays_the_only_copy(
        tmp_path: Path, inference_server: ServiceProcess, fault: str) -> None:
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    if fault == "read-only folder":
        images = write_images(inbox, 12)
        inbox.chmod(0o555)
        batch = home.start(inference_server.address, unprivileged=True)
        reason = "Permission denied"
    else:  # moves across filesystems copy, then remove the source: here the removal fails
        with tmpfs(inbox):
            images = write_images(inbox, 12)
            remount(inbox, "ro")
            batch = home.start(inference_server.address)
            try:
                jobs = [run_job(home, batch, "inbox") for _ in range(2)]
            finally:
                batch.terminate()
            assert {p.name: p.read_bytes() for p in inbox.iterdir()} == images
            check_left_in_place(home, images, jobs, "Read-only file system")
        return
    try:
        jobs = [run_job(home, batch, "inbox") for _ in range(2)]  # the second run must not add copies either
    finally:
        batch.terminate()
        inbox.chmod(0o755)
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == images
    check_left_in_place(home, images, jobs, reason)


def check_left_in_place(home: BatchHome, images: dict[str, bytes], jobs: list[pb.Job], reason: str) -> None:
    assert_conserved(home, images)
    copies = [p for p, what in contents(home.output).items() if what != "dir"] if home.output.exists() else []
    assert not copies
    for job in jobs:
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.failed == len(images) == job.processed, job
        errors = read_summary(home.workdir / job.summary_json)["errors"]
        assert all(f"cannot be moved: {reason}" in e["error"] for e in errors), errors  # type: ignore[union-attr]
    log = (home.workdir / jobs[0].log_file).read_text(encoding="utf-8")
    assert f"cannot be moved: {reason}" in log and "✗ Left in place:" in log


# --- 4, 5: recovery after a crash ------------------------------------------------------------------------

def crash_at(home: BatchHome, inference: ServiceProcess, point: str, folder: str = "inbox", mode: str = "move",
             **extra: str) -> str:
    """Submit a job to a Batch service armed to SIGKILL itself at `point`; the job id once it died."""
    batch = home.start(inference.address, FASHION_BATCH_FAILPOINT=f"{point}:1", FASHION_BATCH_CHUNK_SIZE="4",
                       FASHION_BATCH_IN_FLIGHT="1", **extra)
    try:
        with BatchClient(batch.address) as client:
            job = client.submit(folder, mode=mode)
        assert batch.proc.wait(timeout=60) == -signal.SIGKILL, batch.output()
    finally:
        batch.kill()
    return job.job_id


def moving_rows(home: BatchHome) -> list[tuple[str, str]]:
    return [(s, d) for s, d in home.query("SELECT source, destination FROM files WHERE state = 'moving'")]


def test_recovery_never_follows_a_link_planted_at_the_recorded_destination(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 12)
    job_id = crash_at(home, inference_server, "planned")
    moving = moving_rows(home)
    assert moving
    for source, destination in moving:  # each recorded destination: a link back to its source
        (home.data / destination).symlink_to(home.data / source)
    job = resume(home, inference_server, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.failed == 0, job
    assert_conserved(home, images)
    for _, destination in moving:
        assert (home.data / destination).is_symlink()  # left as it was; the image went to another name


def test_a_transfer_recovery_cannot_finish_fails_the_job_and_frees_its_file(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, 12)
    job_id = crash_at(home, inference_server, "linked")  # one image in two places (hard link), not yet unlinked
    assert len(moving_rows(home)) >= 1
    inbox.chmod(0o555)  # now the source cannot be removed: recovery must undo, not leave two copies
    try:
        job = resume(home, inference_server, job_id, unprivileged=True)
    finally:
        inbox.chmod(0o755)
    assert job.state == pb.JOB_STATE_FAILED, job
    assert "could not finish 1 transfer interrupted by a crash" in job.error and "Permission denied" in job.error
    assert moving_rows(home) == []  # released: no name stays blocked
    assert_conserved(home, images)
    assert sorted(p.name for p in inbox.iterdir()) == sorted(images)
    batch = home.start(inference_server.address)  # a later job takes every file, the released one included
    try:
        again = run_job(home, batch, "inbox")
    finally:
        batch.terminate()
    assert again.state == pb.JOB_STATE_SUCCEEDED and (again.total, again.skipped) == (12, 0), again
    assert not list(inbox.iterdir())
    assert_conserved(home, images)


def test_recovery_with_the_source_folder_swapped_keeps_what_reached_its_destination(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path / "home", jobs_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, 12)
    elsewhere = tmp_path / "elsewhere"
    outside_with_the_same_names(elsewhere, images)
    before = contents(elsewhere)
    job_id = crash_at(home, inference_server, "linked")  # one image linked to its destination, still at its source
    linked = [(s, d) for s, d in moving_rows(home) if (home.data / d).exists()]
    assert len(linked) == 1
    inbox.rename(home.data / "inbox_moved")
    inbox.symlink_to(elsewhere, target_is_directory=True)
    job = resume(home, inference_server, job_id)
    assert contents(elsewhere) == before
    assert job.state == pb.JOB_STATE_FAILED and "is now a symbolic link" in job.error, job
    recorded = home.query("SELECT destination FROM files WHERE source = ?", (linked[0][0],))[0][0]
    assert recorded == linked[0][1]  # recorded where it surely is
    found = regular_files_by_digest(home.data)
    for name, data in images.items():  # nothing lost; only the linked one may have a second name
        assert 1 <= len(found.get(digest(data), [])) <= (2 if linked[0][0].endswith(name) else 1), name


# --- 6: a job that cannot write its results ---------------------------------------------------------------

def test_a_full_disk_while_finishing_fails_the_job_and_no_restart_turns_it_into_success(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 10)
    with tmpfs(home.workdir / "results", size="256k") as results:
        filler = fill(results)
        batch = home.start(inference_server.address)
        try:
            job = run_job(home, batch, "inbox")
        finally:
            batch.terminate()
        assert job.state == pb.JOB_STATE_FAILED, job
        assert "could not write the job's results" in job.error and "No space left on device" in job.error
        filler.unlink()
        batch = home.start(inference_server.address)  # the restart adopts unfinished jobs: this one is not
        try:
            with BatchClient(batch.address) as client:
                later = client.get(job.job_id)
        finally:
            batch.terminate()
    assert later.state == pb.JOB_STATE_FAILED and later.error == job.error, later
    assert_conserved(home, images)
    assert job.processed == 10  # the images themselves were sorted
    assert "BATCH PROCESSING FAILED" in (home.workdir / job.log_file).read_text(encoding="utf-8")


def test_a_data_disk_that_fills_up_mid_job_pauses_the_job_until_there_is_space(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The data root's disk (the SQLite jobs database's too) fills up between a job's plan and its moves: the
    job stops with the reason (no traceback, the service keeps serving) and finishes by itself once there is
    space again, every image sorted once. Before, the SQLite error escaped as a traceback at every attempt."""
    home = BatchHome(tmp_path)
    with tmpfs(home.data, "2m"):
        images = write_images(home.data / "inbox", 12)
        batch = home.start(inference_server.address, FASHION_BATCH_STOP_AT="planned",
                           FASHION_BATCH_POLL_INTERVAL_S="0.5")
        try:
            with BatchClient(batch.address) as client:
                job = client.submit("inbox")
                _, status = os.waitpid(batch.proc.pid, os.WUNTRACED)
                assert os.WIFSTOPPED(status), batch.output()
                filler = fill(home.data)
                os.kill(batch.proc.pid, signal.SIGCONT)
                reason = "the jobs database data/.batch/jobs.db cannot be written: database or disk is full"
                deadline = time.monotonic() + 30
                while batch.output().count(reason) < 2:  # stopped, and tried again at least once
                    assert time.monotonic() < deadline, batch.output()
                    os.kill(batch.proc.pid, signal.SIGCONT)  # a retry may reach the stop point again
                    time.sleep(0.1)
                assert client.get(job.job_id).state not in FINISHED
                assert "Traceback" not in batch.output(), batch.output()
                filler.unlink()
                while (job := client.get(job.job_id)).state not in FINISHED:
                    assert time.monotonic() < deadline + 30, batch.output()
                    os.kill(batch.proc.pid, signal.SIGCONT)
                    time.sleep(0.1)
        finally:
            batch.terminate()
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.processed == 12, job
        assert_conserved(home, images)


# --- 7: scan errors are per entry ---------------------------------------------------------------------------

def test_an_unreadable_subfolder_is_skipped_and_reported_and_the_rest_is_sorted(
        tmp_path: Path, linear_model: tuple[Path, object]) -> None:
    home = BatchHome(tmp_path / "batch")
    inbox = home.data / "inbox"
    readable = write_images(inbox / "ok", 8)
    hidden = write_images(inbox / "locked", 4, start=20)
    (inbox / "locked").chmod(0o000)
    port = free_port()  # the Inference service starts once the watch is on: the scan's events are seen
    batch = home.start(f"127.0.0.1:{port}", unprivileged=True)
    inference = None
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox", recursive=True)
            watch = client.watch(job.job_id, timeout_s=90)
            first = next(watch)
            inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_INFERENCE_PORT=str(port))
            events = [first, *watch]
            job = client.wait(job.job_id, timeout_s=60)
    finally:
        batch.terminate()
        if inference is not None:
            inference.terminate()
        (inbox / "locked").chmod(0o755)
    assert job.state == pb.JOB_STATE_SUCCEEDED and (job.total, job.processed, job.skipped) == (8, 8, 1), job
    reason = "data/inbox/locked cannot be opened: Permission denied"
    assert {"filename": "locked", "reason": reason} in read_summary(home.workdir / job.summary_json)["skipped_files"]
    assert ("locked", "skipped", reason) in {(f.filename, f.status, f.error) for e in events for f in e.files}
    assert f"Skipped (left in place): locked: {reason}" in (home.workdir / job.log_file).read_text(encoding="utf-8")
    assert {p.name for p in (inbox / "locked").iterdir()} == set(hidden)
    assert_conserved(home, {**readable, **hidden})


def test_files_deleted_while_a_folder_is_scanned_are_skipped_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    hits = 0
    for attempt in range(10):
        names = [f"{attempt}_{i:05d}.png" for i in range(6000)]
        for name in names:
            (folder / name).write_bytes(b"x")
        deleter = threading.Thread(target=lambda ns=names: [os.unlink(folder / n) for n in reversed(ns)])
        with OpenFolders(DataRoot(tmp_path)) as folders:
            deleter.start()
            scan = scan_folder(folders, "inbox", recursive=False)
            deleter.join()
        gone = [rel for rel, why in scan.skipped if why == "disappeared while the folder was being listed"]
        assert len(scan.images) + len(gone) <= len(names) and set(scan.images).isdisjoint(gone)
        hits += bool(gone)
        if hits >= 2:
            break
    assert hits >= 2, "the deletions never raced the scan: the test proved nothing"


# --- 8: file names are data -----------------------------------------------------------------------------------

def test_hostile_file_names_become_neither_formulas_nor_log_lines(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    source = write_images(inbox, 4)
    hostile = ['=HYPERLINK("evil.example?x","x")&"a".png', "+cmd.png", "@sum.png",
               "b.png\n[2026-01-01 00:00:00] BATCH PROCESSING COMPLETED.png"]
    images = {}
    for name, (old, data) in zip(hostile, source.items(), strict=True):
        (inbox / old).rename(inbox / name)
        images[name] = data
    batch = home.start(inference_server.address)
    try:
        job = run_job(home, batch, "inbox")
    finally:
        batch.terminate()
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.processed == 4, job
    with open(home.workdir / job.results_csv, newline="", encoding="utf-8") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert sorted(cells) == sorted(["'" + n if n[0] in "=+@" else n for n in hostile])
    log = (home.workdir / job.log_file).read_text(encoding="utf-8")
    assert "Processing [4/4]: b.png\\n[2026-01-01 00:00:00] BATCH PROCESSING COMPLETED.png\n" in log
    assert not [line for line in log.splitlines() if line.startswith("[2026-01-01")]  # no forged line
    assert_conserved(home, images)

    unescaped = BatchHome(tmp_path / "unescaped")  # FASHION_BATCH_CSV_ESCAPE_FORMULAS=false: names as they are
    (unescaped.data / "inbox").mkdir(parents=True)
    for name, data in images.items():
        (unescaped.data / "inbox" / name).write_bytes(data)
    batch = unescaped.start(inference_server.address, FASHION_BATCH_CSV_ESCAPE_FORMULAS="false")
    try:
        job = run_job(unescaped, batch, "inbox")
    finally:
        batch.terminate()
    assert sorted(r["filename"] for r in read_csv(unescaped.workdir / job.results_csv)) == sorted(hostile)


# --- crash points: SIGKILL where recovery has the most to do, then restart ------------------------------

@pytest.mark.parametrize(("points", "mode", "across_filesystems"), [
    (["copied"], "copy", False),
    (["planned"], "copy", False),
    (["copied"], "move", True),
    (["linked", "recovering"], "move", False),
    (["planned", "replanned"], "move", False),
    (["recorded"], "move", False),
    (["finishing"], "move", False),
], ids=["copy-copied", "copy-planned", "across-filesystems-copied", "recovery-interrupted", "replanning",
        "recorded-before-csv", "finishing"])
def test_a_crash_at_every_step_loses_and_duplicates_nothing(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess, points: list[str], mode: str,
        across_filesystems: bool) -> None:
    """Each point in turn kills the service (the later ones while it recovers from the earlier);
    a last clean start finishes the job."""
    home = BatchHome(tmp_path, jobs_database)
    inbox = home.data / "inbox"
    with contextlib.ExitStack() as stack:
        if across_filesystems:
            stack.enter_context(tmpfs(inbox))
        images = write_images(inbox, 24)
        job_id = crash_at(home, inference_server, points[0], mode=mode)
        assert moving_rows(home) or points[0] in ("recorded", "finishing")
        planted = {}
        if "replanned" in points:  # someone else's files appear at the recorded names: recovery must pick others
            for _, destination in moving_rows(home):
                planted[destination] = b"someone else's file " + destination.encode()
                (home.data / destination).write_bytes(planted[destination])
        for point in points[1:]:
            batch = home.start(inference_server.address, wait=False, FASHION_BATCH_FAILPOINT=f"{point}:1")
            try:
                assert batch.proc.wait(timeout=60) == -signal.SIGKILL, batch.output()
            finally:
                batch.kill()
        batch = home.start(inference_server.address)
        try:
            with BatchClient(batch.address) as client:
                job = client.wait(job_id, timeout_s=60)
        finally:
            batch.terminate()
        assert job.state == pb.JOB_STATE_SUCCEEDED and (job.processed, job.failed) == (24, 0), job
        assert_conserved(home, images, copy=mode == "copy")
        if mode == "move":
            assert not list(inbox.iterdir())
    rows = read_csv(home.workdir / job.results_csv)
    assert sorted(r["filename"] for r in rows) == sorted(images)  # complete, no duplicates
    summary = read_summary(home.workdir / job.summary_json)
    assert (summary["state"], summary["total_processed"], summary["failed"]) == ("succeeded", 24, 0)
    log = (home.workdir / job.log_file).read_text(encoding="utf-8")
    assert log.count("BATCH PROCESSING COMPLETED") == 1
    assert {rel: (home.data / rel).read_bytes() for rel in planted} == planted  # untouched, beside the images


def test_a_full_output_disk_fails_the_job_saying_so_and_leaves_the_images_for_the_next_run(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The output folder on a disk of its own that is full: every move (a copy across filesystems) is refused.
    The job SUCCEEDED before with every image "failed" (exit 0 from fashion batch run, as if all was well);
    now it FAILS naming the folder and the reason, every image stays in the inbox, and once there is space
    the next run sorts them all."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 12)
    with tmpfs(home.data / "sorted", "256k") as sorted_disk:
        filler = fill(sorted_disk)
        env = {**os.environ, "COLUMNS": "200", **home.env(inference_server.address)}
        failed = subprocess.run([FASHION, "batch", "run", "inbox", "--output", "sorted", "--json"], cwd=home.workdir,
                                env=env, capture_output=True, text=True, timeout=120)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        job = json.loads(failed.stdout)
        assert job["state"] == "failed" and re.fullmatch(
            r"the disk of data/sorted/\w+ is full \(No space left on device\): the images not sorted yet stay where "
            r"they are for the next run", job["error"]), job
        assert sorted(p.name for p in (home.data / "inbox").iterdir()) == sorted(images)
        filler.unlink()
        again = subprocess.run([FASHION, "batch", "run", "inbox", "--output", "sorted", "--json"], cwd=home.workdir,
                               env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads(again.stdout)["processed"] == 12
        assert_conserved(home, images)

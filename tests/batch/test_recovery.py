"""Nothing lost: the Batch service killed (SIGKILL) mid-job and restarted, the Inference service
stopped and restarted mid-job, cancellation. Each test owns its processes, and runs on each jobs
database (SQLite, PostgreSQL)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import (
    BatchHome,
    assert_all_sorted_once,
    files_under,
    read_csv,
    read_summary,
    wait_for,
    write_images,
)
from tests.conftest import start_inference
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(180)
SLOW = {"FASHION_BATCH_CHUNK_SIZE": "2", "FASHION_BATCH_IN_FLIGHT": "1"}  # many small steps: time to interrupt


def test_sigkill_mid_job_then_restart_finishes_without_loss_or_duplicates(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, 300)
    batch = home.start(inference_server.address, **SLOW)
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox")
            wait_for(client, job.job_id, lambda j: j.processed >= 30, what="30 images sorted")
            batch.kill()
        done = home.query("SELECT COUNT(*) FROM files WHERE state = 'done'")[0][0]
        assert 30 <= done < 300, f"the kill should land mid-job ({done} done)"
        batch = home.start(inference_server.address)  # resumes the job on start
        with BatchClient(batch.address) as client:
            job = client.wait(job.job_id, timeout_s=120)
    finally:
        batch.kill()
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert_all_sorted_once(home, inbox, images, job)
    log = (home.workdir / job.log_file).read_text(encoding="utf-8")
    assert log.count("BATCH PROCESSING STARTED") == 1 and "BATCH PROCESSING RESUMED" in log
    headers = re.findall(r"\nProcessing \[(\d+)/300\]: (item_\d+\.png)\n", log)
    # No image sorted twice; only the blocks of the group being written at the kill may be missing.
    assert len(headers) == len(set(headers)) == len({name for _, name in headers}) >= 290


def test_inference_down_mid_job_waits_and_survives_a_batch_crash_while_waiting(
        tmp_path: Path, jobs_database: str | None, linear_model) -> None:
    home = BatchHome(tmp_path / "batch", jobs_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, 160)
    port = free_port()
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_INFERENCE_PORT=str(port))
    batch: ServiceProcess | None = None
    try:
        inference.wait_serving()
        batch = home.start(inference.address, **SLOW)
        with BatchClient(batch.address) as client:
            job = client.submit("inbox")
            wait_for(client, job.job_id, lambda j: j.processed >= 10, what="10 images sorted")
            inference.kill()
            waiting = wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_WAITING, what="WAITING")
            assert "waiting for the Inference service" in waiting.error and waiting.failed == 0
            batch.kill()  # crash while waiting, with calls in flight
        batch = home.start(inference.address, **SLOW)
        with BatchClient(batch.address) as client:
            resumed = wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_WAITING, what="WAITING again")
            assert resumed.failed == 0 and resumed.processed < 160
            inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_INFERENCE_PORT=str(port))
            job = client.wait(job.job_id, timeout_s=120)
    finally:
        if batch is not None:
            batch.kill()
        inference.terminate()
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.error == "", job
    assert_all_sorted_once(home, inbox, images, job)
    log = (home.workdir / job.log_file).read_text(encoding="utf-8")
    assert "✗ API not available (UNAVAILABLE" in log and log.count("✓ API is healthy and ready") >= 2


def test_cancel_a_waiting_job_and_a_queued_one_leaves_their_files_in_place(
        tmp_path: Path, jobs_database: str | None) -> None:
    home = BatchHome(tmp_path, jobs_database)
    first = write_images(home.data / "first", 5)
    second = write_images(home.data / "second", 3, start=10)
    batch = home.start(f"127.0.0.1:{free_port()}")  # nothing listens there: jobs wait for it
    try:
        with BatchClient(batch.address) as client:
            a = client.submit("first")
            wait_for(client, a.job_id, lambda j: j.state == pb.JOB_STATE_WAITING, what="WAITING")
            b = client.submit("second")
            assert client.get(b.job_id).state == pb.JOB_STATE_QUEUED  # one job at a time
            b = client.cancel(b.job_id)
            assert b.state == pb.JOB_STATE_CANCELLED and not b.results_csv  # never started
            events = client.watch(a.job_id, timeout_s=30)
            a = client.cancel(a.job_id)
            last = list(events)[-1].job
    finally:
        batch.terminate()
    assert a.state == last.state == pb.JOB_STATE_CANCELLED and a.processed == 0, a
    for folder, files in (("first", first), ("second", second)):
        for name, data in files.items():
            assert (home.data / folder / name).read_bytes() == data
    assert not home.output.exists() or not any(home.output.rglob("*.png"))
    assert read_csv(home.workdir / a.results_csv) == []
    summary = read_summary(home.workdir / a.summary_json)
    # It was cancelled while waiting to start: it never listed (claimed) the folder's files.
    assert (summary["state"], summary["total_processed"], summary["total_images"]) == ("cancelled", 0, 0)
    assert "BATCH PROCESSING CANCELLED" in (home.workdir / a.log_file).read_text(encoding="utf-8")


def test_cancel_a_running_job_keeps_what_is_sorted_and_leaves_the_rest(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, 200)
    batch = home.start(inference_server.address, **SLOW)
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox")
            wait_for(client, job.job_id, lambda j: j.processed >= 10, what="10 images sorted")
            job = client.cancel(job.job_id)
    finally:
        batch.terminate()
    assert job.state == pb.JOB_STATE_CANCELLED and 10 <= job.processed < 200, job
    left = {p.name for p in inbox.iterdir()}
    sorted_ = files_under(home.output)
    assert len(left) == 200 - job.processed and len(sorted_) == job.processed
    assert left | set(sorted_) == set(images) and not left & set(sorted_)
    rows = read_csv(home.workdir / job.results_csv)
    assert sorted(r["filename"] for r in rows) == sorted(sorted_)
    summary = read_summary(home.workdir / job.summary_json)
    assert (summary["total_processed"], summary["not_processed"]) == (job.processed, len(left))


@pytest.mark.parametrize("point", ["planned", "linked", "moved"])
def test_a_crash_at_each_step_of_sorting_is_recovered_at_restart(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess, point: str) -> None:
    """SIGKILL exactly where recovery has work to do (see services/batch/failpoints.py)."""
    home = BatchHome(tmp_path, jobs_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, 24)
    batch = home.start(inference_server.address, FASHION_BATCH_FAILPOINT=f"{point}:1",
                       FASHION_BATCH_CHUNK_SIZE="8", FASHION_BATCH_IN_FLIGHT="1")
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox")
        assert batch.proc.wait(timeout=60) == -signal.SIGKILL, batch.output()
    finally:
        batch.kill()
    moving = home.query("SELECT source, destination FROM files WHERE state = 'moving'")
    assert moving, "the crash should leave transfers recorded as started"
    at_source = [(home.data / s).exists() for s, _ in moving]
    at_destination = [(home.data / d).exists() for _, d in moving]
    if point == "planned":  # recorded, nothing moved
        assert all(at_source) and not any(at_destination)
    elif point == "linked":  # one file in two places (same inode), the rest not started
        both = [(home.data / s) for (s, d), a, b in zip(moving, at_source, at_destination, strict=True) if a and b]
        assert len(both) == 1 and both[0].stat().st_nlink == 2
    else:  # moved, not recorded as done
        assert not any(at_source) and all(at_destination)

    batch = home.start(inference_server.address)
    try:
        with BatchClient(batch.address) as client:
            job = client.wait(job.job_id, timeout_s=60)
    finally:
        batch.terminate()
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert_all_sorted_once(home, inbox, images, job)
    assert f"Recovered {len(moving)} transfers interrupted by a crash" in (
        home.workdir / job.log_file).read_text(encoding="utf-8")

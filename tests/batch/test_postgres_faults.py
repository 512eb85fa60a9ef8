"""The Batch service on PostgreSQL when the database misbehaves mid-job: a replica's backend terminated
while it has transfers recorded as moving (another replica takes them over), the server hung (SIGSTOP),
the server's disk full. The job stops with the reason and resumes by itself; no image is lost, sorted
twice or recorded otherwise than where it is.

These tests stop, hang or fill their own PostgreSQL server (tests/postgres.py, fsync on), never the
session's shared one; skipped with the reason where PostgreSQL is not installed (or, for the full disk,
where this process may not mount a tmpfs)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from fashion.v1 import batch_pb2_grpc
from tests.batch.conftest import BatchHome, assert_all_sorted_once, fill, tmpfs, wait_for, write_images
from tests.postgres import PASSWORD, PostgresServer, missing_reason
from tests.support import ServiceProcess

pytestmark = pytest.mark.timeout(120)
STEPS = {"FASHION_BATCH_CHUNK_SIZE": "8", "FASHION_BATCH_IN_FLIGHT": "1", "FASHION_BATCH_POLL_INTERVAL_S": "0.3"}
SLOW = {**STEPS, "FASHION_BATCH_CHUNK_SIZE": "2"}  # many small steps: a fault lands mid-job


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own, which its tests may hang."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer(durable=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def process_state(svc: ServiceProcess) -> str:
    """The process's state letter in /proc ("T": stopped by a FASHION_BATCH_STOP_AT point)."""
    return Path(f"/proc/{svc.proc.pid}/stat").read_text().rpartition(")")[2].split()[0]


def wait_stopped(svc: ServiceProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while process_state(svc) != "T":
        assert svc.proc.poll() is None and time.monotonic() < deadline, svc.output()[-3000:]
        time.sleep(0.02)


def go_on(svc: ServiceProcess) -> None:
    """SIGCONT when it stopped at its FASHION_BATCH_STOP_AT point (it stops there each time)."""
    if svc.proc.poll() is None and process_state(svc) == "T":
        os.kill(svc.proc.pid, signal.SIGCONT)


def test_a_replica_whose_backend_was_terminated_moves_no_file_the_replica_taking_over_finishes(
        tmp_path: Path, own_postgres: PostgresServer, inference_server: ServiceProcess) -> None:
    """Replica a runs the job and stops (SIGSTOP) with a group recorded as moving, nothing moved; its backend
    is terminated, so replica b adopts the job and takes those transfers over. b stops right after it looked
    at the first one (the file still at its source: to be moved), then a runs again. Before, a went on moving
    its group from memory until its next query, under b's feet: b then found that file gone from its source
    and recorded it as failed ("disappeared") while it lay sorted, and the summary counted a failure."""
    url = own_postgres.create_database()
    home = BatchHome(tmp_path, url)
    inbox = home.data / "inbox"
    images = write_images(inbox, 24)
    a = home.start(inference_server.address, FASHION_BATCH_STOP_AT="planned", **STEPS)
    b = None
    try:
        with BatchClient(a.address) as client:
            job = client.submit("inbox")
        wait_stopped(a)
        with psycopg.connect(url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name ="
                                 " 'fashion-batch' AND datname = current_database()").fetchall()
        b = home.start(inference_server.address, wait=False, FASHION_BATCH_STOP_AT="recovering",
                       FASHION_LOG_DIR="logs_b", **STEPS)
        wait_stopped(b)  # it took a's transfers over and looked at the first one
        os.kill(a.proc.pid, signal.SIGCONT)
        time.sleep(1)  # a's turn to move files, were it to
        deadline = time.monotonic() + 60
        while b.proc.poll() is None and (state := home.query(
                "SELECT state FROM jobs WHERE job_id = ?", (job.job_id,))[0][0]) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, state
            go_on(b)
            go_on(a)
            time.sleep(0.05)
        b.wait_serving()
        with BatchClient(b.address) as client:
            job = client.wait(job.job_id, timeout_s=60)
    finally:
        for replica in (a, b):
            if replica is not None:
                go_on(replica)
                replica.kill()
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.error == "", job
    assert_all_sorted_once(home, inbox, images, job)
    assert "lost the connection to the jobs database" in a.output()


def test_a_hung_server_is_given_up_with_the_reason_and_the_job_resumes_when_it_answers_again(
        tmp_path: Path, own_postgres: PostgresServer, inference_server: ServiceProcess) -> None:
    """The server's processes SIGSTOPped mid-job: connections stay open and nothing answers. Before, every
    call waited forever (a GetJob ran into its caller's deadline, the job stood still without a word); now a
    call that waited the URL's connect_timeout, when a new connection is not answered either, is given up:
    UNAVAILABLE with the reason, the job stops. Once the server runs again the job resumes by itself."""
    home = BatchHome(tmp_path, own_postgres.create_database() + "?connect_timeout=2")
    inbox = home.data / "inbox"
    images = write_images(inbox, 200)
    batch = home.start(inference_server.address, **SLOW)
    stopped: list[int] = []
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox")
            wait_for(client, job.job_id, lambda j: j.processed >= 10, what="10 images sorted")
            stopped = own_postgres.pause()
            with grpc.insecure_channel(batch.address) as channel:  # no client retries: the server's answer
                with pytest.raises(grpc.RpcError) as refused:
                    batch_pb2_grpc.BatchServiceStub(channel).GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10)
            time.sleep(2)  # the job's runs stopped meanwhile; the server still hung
            own_postgres.resume(stopped)
            stopped = []
            job = client.wait(job.job_id, timeout_s=60)
    finally:
        own_postgres.resume(stopped)
        batch.kill()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "did not answer" in refused.value.details() and PASSWORD not in refused.value.details()
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.error == "", job
    assert_all_sorted_once(home, inbox, images, job)
    assert "Interrupted (lost the connection to the jobs database" in (home.workdir / job.log_file).read_text("utf-8")


def test_a_full_database_disk_stops_the_job_which_resumes_once_there_is_space(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The server's data folder on a small tmpfs, filled mid-job: its writes fail (could not extend file: No
    space left on device). Before, the job ended FAILED ("internal error: DiskFull ...") with most images
    unsorted; now it stops with the reason in the log and resumes, here, once there is space."""
    if missing_reason() is not None:
        pytest.skip(missing_reason())
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # PostgreSQL's user must reach it (pytest's tmp_path it cannot)
    base.chmod(0o755)
    try:
        with tmpfs(base / "pg", "96m") as folder:
            server = PostgresServer(folder=folder, durable=True)
            server.start()
            try:
                home = BatchHome(tmp_path, server.create_database())
                inbox = home.data / "inbox"
                images = write_images(inbox, 200)
                batch = home.start(inference_server.address, **SLOW)
                try:
                    with BatchClient(batch.address) as client:
                        job = client.submit("inbox")
                        wait_for(client, job.job_id, lambda j: j.processed >= 10, what="10 images sorted")
                        filler = fill(folder)
                        deadline = time.monotonic() + 30
                        while "No space left on device" not in batch.output():
                            assert time.monotonic() < deadline, batch.output()[-3000:]
                            time.sleep(0.1)
                        time.sleep(1)  # several attempts to resume, all refused
                        during = client.get(job.job_id)  # reads still work
                        filler.unlink()
                        job = client.wait(job.job_id, timeout_s=60)
                finally:
                    batch.kill()
                assert during.state == pb.JOB_STATE_RUNNING and during.processed < 200, during
                assert job.state == pb.JOB_STATE_SUCCEEDED and job.error == "", job
                assert_all_sorted_once(home, inbox, images, job)
                assert "the jobs database" in batch.output() and "cannot do this now: could not extend file" in (
                    batch.output())
            finally:
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)

"""Batch service replicas on one PostgreSQL jobs database (tests/postgres.py: skipped with the reason
where PostgreSQL is not installed): two processes split one big job's files, with nothing lost or
sorted twice, also when one of them is SIGKILLed mid-job (the other takes its work over); a
replica helping with a job leaves off at once for a job that nobody runs, and never for one another
live replica runs; a database that cannot be reached stops the start with the reason and never the
password.

The replicas share the data root and the results folder (as pods share their volume) and write
their per-run logs to their own folders, so each one's log says which images it sorted."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import BatchHome, assert_all_sorted_once, read_csv, wait_for, write_images
from tests.conftest import start_inference
from tests.postgres import PASSWORD
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(240)
IMAGES = 400
REPLICA = {"FASHION_BATCH_CHUNK_SIZE": "2", "FASHION_BATCH_IN_FLIGHT": "1", "FASHION_BATCH_POLL_INTERVAL_S": "0.2"}
PACE_MS = 150  # the paced Inference service's wait for a fuller batch: each call of a job lasts about this long
BIG = 500  # images of each of the jobs a replica runs: with PACE_MS, tens of seconds however fast the machine
SMALL = 6  # images of the job that must not wait for them


@pytest.fixture(scope="module")
def paced_inference(tmp_path_factory: pytest.TempPathFactory, linear_model: tuple[Path, np.ndarray]
                    ) -> Iterator[ServiceProcess]:
    """An Inference service that answers a call only once its batcher waited PACE_MS for a fuller batch."""
    svc = start_inference(tmp_path_factory.mktemp("paced-inference"), linear_model[0],
                          FASHION_MAX_DELAY_MS=str(PACE_MS))
    try:
        svc.wait_serving()
        yield svc
    finally:
        svc.terminate()


def start_replicas(home: BatchHome, inference: ServiceProcess, **b_extra: str) -> tuple[ServiceProcess, ServiceProcess]:
    """Replicas a (logs in logs/) and b (logs in logs_b/), both serving."""
    a = home.start(inference.address, wait=False, **REPLICA)
    b = home.start(inference.address, wait=False, FASHION_LOG_DIR="logs_b", **REPLICA, **b_extra)
    for replica in (a, b):
        try:
            replica.wait_serving(timeout=60)
        except BaseException:
            a.kill()
            b.kill()
            raise
    return a, b


def sorted_by(home: BatchHome, log_dir: str, job: pb.Job) -> list[str]:
    """The images a replica's per-run log says it sorted (one block per image)."""
    log = home.workdir / log_dir / Path(job.log_file).name
    text = log.read_text(encoding="utf-8") if log.exists() else ""
    return re.findall(rf"\nProcessing \[\d+/{IMAGES}\]: (item_\d+\.png)\n", text)


def workers_done(home: BatchHome, job_id: str) -> dict[str, int]:
    return dict(home.query("SELECT worker, COUNT(*) FROM files WHERE job_id = ? AND state = 'done' GROUP BY worker",
                           (job_id,)))


def check_one_job(home: BatchHome, inbox: Path, images: dict[str, bytes], job: pb.Job,
                  output: Path | None = None) -> None:
    """Every input in exactly one place (under `output`, else home.output), the CSV, the summary and the
    records agree, nothing left in flight, and the password in no log."""
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.error == "", job
    assert_all_sorted_once(home, inbox, images, job, output)
    recorded = {Path(s).name: outcome for s, outcome in home.query(
        "SELECT source, outcome FROM files WHERE job_id = ?", (job.job_id,))}
    rows = read_csv(home.workdir / job.results_csv)
    assert {r["filename"]: r["status"] for r in rows} == recorded  # one row per image, as recorded
    assert home.query("SELECT COUNT(*) FROM files WHERE state != 'done'") == [(0,)]
    for path in [*home.workdir.glob("logs*/*"), *home.workdir.glob("*.out")]:
        assert PASSWORD not in path.read_text(errors="replace"), path


def test_two_replicas_split_one_big_job_with_nothing_lost_or_sorted_twice(
        tmp_path: Path, postgres_database: str, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, postgres_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, IMAGES)
    a, b = start_replicas(home, inference_server)  # both create the schema at once: one of them does
    try:
        with BatchClient(a.address) as client:
            job = client.submit("inbox")
            job = client.wait(job.job_id, timeout_s=180)
        with BatchClient(b.address) as client:
            seen = client.get(job.job_id)  # one database: either replica answers for the job
            assert (seen.state, seen.processed, seen.results_csv) == (job.state, job.processed, job.results_csv)
    finally:
        a.terminate()
        b.terminate()
    check_one_job(home, inbox, images, job)
    by_a, by_b = sorted_by(home, "logs", job), sorted_by(home, "logs_b", job)
    assert by_a and by_b, (len(by_a), len(by_b))  # the job was split between them
    assert sorted(by_a + by_b) == sorted(images)  # and no image sorted by both, or twice
    assert len(workers_done(home, job.job_id)) == 2
    helper_log = (home.workdir / "logs_b" / Path(job.log_file).name).read_text(encoding="utf-8")
    assert "helps with job" in helper_log and "BATCH PROCESSING STARTED" not in helper_log


@pytest.mark.parametrize("killed", ["the helper, moving a file", "the job's runner"])
def test_a_replica_killed_mid_job_leaves_its_work_to_the_other(
        tmp_path: Path, postgres_database: str, inference_server: ServiceProcess, killed: str) -> None:
    """SIGKILL one replica while both sort the job: the other one finishes the dead one's transfers
    from their records, sorts the images it had claimed, and ends the job."""
    home = BatchHome(tmp_path, postgres_database)
    inbox = home.data / "inbox"
    images = write_images(inbox, IMAGES)
    helper_dies = killed.startswith("the helper")
    # The helper dies by itself with one image linked to its destination, not yet removed from its source.
    a, b = start_replicas(home, inference_server, **({"FASHION_BATCH_FAILPOINT": "linked:40"} if helper_dies else {}))
    survivor = a
    try:
        with BatchClient(a.address) as client:
            job = client.submit("inbox")
            if helper_dies:
                assert b.proc.wait(timeout=120) == -signal.SIGKILL, b.output()
                assert client.get(job.job_id).processed < IMAGES, "the helper should die mid-job"
            else:
                deadline = time.monotonic() + 120
                while len(done := workers_done(home, job.job_id)) < 2 or min(done.values()) < 20:
                    assert time.monotonic() < deadline, done
                    time.sleep(0.02)
                a_log = home.workdir / "logs" / Path(client.get(job.job_id).log_file).name
                runner, survivor = (a, b) if "BATCH PROCESSING STARTED" in a_log.read_text("utf-8") else (b, a)
                runner.kill()
                done = home.query("SELECT COUNT(*) FROM files WHERE job_id = ? AND state = 'done'", (job.job_id,))
                assert done[0][0] < IMAGES, "the kill should land mid-job"
        with BatchClient(survivor.address) as client:
            job = client.wait(job.job_id, timeout_s=180)
    finally:
        a.kill()
        b.kill()
    check_one_job(home, inbox, images, job)
    assert len(workers_done(home, job.job_id)) == 2  # both sorted some
    survivor_logs = "logs" if survivor is a else "logs_b"
    survivor_log = (home.workdir / survivor_logs / Path(job.log_file).name).read_text(encoding="utf-8")
    assert "BATCH PROCESSING COMPLETED" in survivor_log
    if helper_dies:  # its linked file (in two places) and the rest of its group: finished from their records
        assert re.search(r"Recovered \d+ transfers interrupted by a crash", survivor_log), survivor_log[-3000:]
    else:  # the survivor adopted the job at its next look at the database
        assert "BATCH PROCESSING RESUMED" in survivor_log


def helping_lines(home: BatchHome, log_dir: str) -> list[str]:
    """The "helps with job" lines of a replica's per-run logs: one each time it begins helping with a job."""
    return [line for path in sorted((home.workdir / log_dir).glob("batch_[0-9]*.log"))
            for line in path.read_text(encoding="utf-8").splitlines() if "helps with job" in line]


def unclaimed(home: BatchHome, job_id: str) -> int:
    """The job's images no worker has claimed yet."""
    return home.query("SELECT COUNT(*) FROM files WHERE job_id = ? AND state = 'pending' AND worker = ''",
                      (job_id,))[0][0]


@pytest.mark.parametrize("submitted_to", ["the helping replica", "the busy replica"])
def test_a_helping_replica_leaves_off_for_a_job_nobody_runs_and_never_for_one_another_replica_runs(
        tmp_path: Path, postgres_database: str, paced_inference: ServiceProcess, submitted_to: str) -> None:
    """Replica a runs two big jobs at once (both its slots), replica b helps with one of them. The other
    one, which a live replica runs, never stops b's helping: one "helps with job" line in b's logs over
    many rounds. A small job that nobody runs (submitted to b; or to a, which has no free slot, so b's
    next round finds it) is run by b at once: it ends while both big jobs still have unclaimed images.
    Every image of the three jobs is sorted exactly once."""
    home = BatchHome(tmp_path, postgres_database)
    big = {name: write_images(home.data / name, BIG, prefix=name) for name in ("big1", "big2")}
    small = write_images(home.data / "small", SMALL, prefix="small")
    a = home.start(paced_inference.address, FASHION_BATCH_MAX_CONCURRENT_JOBS="2", **REPLICA)
    b = None
    try:
        with BatchClient(a.address) as client:
            jobs = {name: client.submit(name, output_dir=f"sorted_{name}") for name in big}
            for job in jobs.values():  # both run by a before b starts (b's first round could adopt one)
                wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING and j.total == BIG,
                         what="replica a to run both big jobs")
        b = home.start(paced_inference.address, FASHION_LOG_DIR="logs_b", **REPLICA)
        deadline = time.monotonic() + 60
        while not helping_lines(home, "logs_b"):
            assert time.monotonic() < deadline, b.output()
            time.sleep(0.05)
        time.sleep(1.5)  # several rounds of b's, each offering it both big jobs: they are run by a, b stays put
        lines = helping_lines(home, "logs_b")
        left = {name: unclaimed(home, job.job_id) for name, job in jobs.items()}
        assert len(lines) == 1, lines
        assert all(left.values()), left  # (so b had no reason to switch jobs meanwhile)

        target = b if submitted_to == "the helping replica" else a
        with BatchClient(target.address) as client:
            started = time.monotonic()
            job = client.submit("small", output_dir="sorted_small")
        with BatchClient(b.address) as client:
            small_job = client.wait(job.job_id, timeout_s=120)
        took = time.monotonic() - started
        left = {name: unclaimed(home, job.job_id) for name, job in jobs.items()}
        assert all(left.values()), (left, took)  # b did not wait until the big jobs' images were all claimed
        small_log = (home.workdir / "logs_b" / Path(small_job.log_file).name).read_text(encoding="utf-8")
        assert "BATCH PROCESSING STARTED" in small_log  # b ran it
        assert "Stopping helping with job" in b.output(), b.output()[-3000:]

        with BatchClient(a.address) as client:
            ended = {name: client.wait(job.job_id, timeout_s=180) for name, job in jobs.items()}
    finally:
        a.terminate()
        if b is not None:
            b.terminate()
    check_one_job(home, home.data / "small", small, small_job, home.data / "sorted_small")
    for name, job in ended.items():
        check_one_job(home, home.data / name, big[name], job, home.data / f"sorted_{name}")
    helped = [job for job in ended.values() if any(job.job_id in line for line in lines)]
    assert len(helped) == 1 and len(workers_done(home, helped[0].job_id)) == 2, workers_done(home, helped[0].job_id)


def test_an_unreachable_database_stops_the_start_with_the_reason_and_never_the_password(tmp_path: Path) -> None:
    port = free_port()
    home = BatchHome(tmp_path, f"postgresql://fashion:{PASSWORD}@127.0.0.1:{port}/jobs")
    batch = home.start("127.0.0.1:1", wait=False)
    assert batch.proc.wait(timeout=60) == 1, batch.output()
    output = batch.output()
    assert f"cannot connect to the jobs database fashion@127.0.0.1:{port}/jobs" in output, output
    assert PASSWORD not in output and "Traceback" not in output


@pytest.mark.parametrize("password", ["Xy7%Qp!2zz", "with space 9"])
def test_a_database_url_that_does_not_parse_is_refused_without_its_password(tmp_path: Path, password: str) -> None:
    """A raw % or a space in the password (a generated one, not percent-encoded): psycopg quotes the URL's
    pieces in its error; neither the output nor the log files may show the password."""
    home = BatchHome(tmp_path, f"postgresql://fashion:{password}@127.0.0.1:{free_port()}/jobs")
    batch = home.start("127.0.0.1:1", wait=False)
    assert batch.proc.wait(timeout=60) == 1, batch.output()
    output = batch.output()
    assert "is not a usable PostgreSQL URL" in output and "percent-encoded" in output, output
    logs = "".join(p.read_text(encoding="utf-8") for p in (home.workdir / "logs").glob("*.log"))
    assert "is not a usable PostgreSQL URL" in logs
    for shown in (output, logs):
        assert password not in shown and password.split()[0] not in shown and "Traceback" not in shown, shown

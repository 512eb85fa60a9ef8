"""Requests no client of ours sends, through real gRPC channels on real ports and the `fashion` CLI as a
user runs it: enum numbers the API does not define, paths the file system refuses, job ids a million
characters long, idempotency keys reused for other arguments or of any length; and a cancelled job,
which is no run for batch health. Each is refused with a status naming the problem (never UNKNOWN),
nothing is moved, and the service keeps serving. On both jobs databases."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from fashion.v1 import batch_pb2_grpc as pb_grpc
from fashion.v1 import health_pb2
from tests.batch.conftest import BatchHome, contents, wait_for, write_images
from tests.batch.test_cli import fashion
from tests.support import ServiceProcess, free_port, health_status

pytestmark = pytest.mark.timeout(180)
SERVICE = "fashion.v1.BatchService"


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _assert_serving_and_quiet(home: BatchHome, server: ServiceProcess) -> None:
    """Still serving, and nothing logged as unexpected (an UNKNOWN status logs its traceback)."""
    assert health_status(server.address, SERVICE) == "SERVING"
    log = (home.workdir / "logs" / "batch_service.log").read_text(encoding="utf-8")
    assert "status=UNKNOWN" not in log and "Traceback" not in log, log[-3000:]


def test_enum_numbers_the_api_does_not_define_are_refused_and_nothing_moves(
        batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    images = write_images(batch_home.data / "modes", 3)
    before = contents(batch_home.data / "modes")
    with grpc.insecure_channel(batch_server.address) as channel:
        stub = pb_grpc.BatchServiceStub(channel)
        for mode in (3, 7, -1):
            err = _refused(lambda m=mode: stub.SubmitJob(pb.SubmitJobRequest(input_dir="modes", mode=m)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert f"unknown transfer mode {mode}" in err.details(), err.details()
        for state in (7, 99, -2):
            err = _refused(lambda s=state: stub.ListJobs(pb.ListJobsRequest(state=s)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert f"unknown job state {state}" in err.details(), err.details()
        copied = stub.SubmitJob(pb.SubmitJobRequest(input_dir="modes", mode=pb.TRANSFER_MODE_COPY))
    assert contents(batch_home.data / "modes") == before  # no job moved them
    with BatchClient(batch_server.address) as client:
        assert [j.job_id for j in client.list(1000) if j.input_dir == "modes"] == [copied.job_id]
        job = client.wait(copied.job_id, timeout_s=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.mode == pb.TRANSFER_MODE_COPY and job.processed == len(images)
    assert contents(batch_home.data / "modes") == before  # copied, not moved
    _assert_serving_and_quiet(batch_home, batch_server)


def test_paths_the_file_system_refuses_are_invalid_arguments_naming_the_reason(
        batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    write_images(batch_home.data / "longnames", 2)
    before = contents(batch_home.data / "longnames")
    cases = [
        {"input_dir": "x" * 5000},  # longer than PATH_MAX
        {"input_dir": "n" * 300},  # one name longer than NAME_MAX
        {"input_dir": "deep/" * 1200},
        {"input_dir": "longnames", "output_dir": "o" * 300},
        {"input_dir": "longnames", "output_dir": "sorted/" + "o" * 5000},
    ]
    with BatchClient(batch_server.address) as client:
        for request in cases:
            err = _refused(lambda r=request: client.submit(**r))  # type: ignore[arg-type]
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details()[:300])
            what = "output_dir" if "output_dir" in request else "input_dir"
            assert err.details().startswith(f"{what} '") and "cannot be used: File name too long" in err.details()
            assert len(err.details()) < 1000, err.details()  # the name cut, not quoted whole
    assert contents(batch_home.data / "longnames") == before
    _assert_serving_and_quiet(batch_home, batch_server)


def test_fashion_batch_run_of_a_name_too_long_says_so_in_one_line(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 1)
    for name in ("n" * 300, "x" * 5000):
        run = fashion(home, inference_server.address, "run", name)
        assert run.returncode == 2, run.stdout + run.stderr[-2000:]
        assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr[-2000:]
        assert "cannot be used: File name too long" in run.stderr, run.stderr
    assert sorted(p.name for p in (home.data / "inbox").iterdir()) == sorted(images)
    logs = [p.read_text(encoding="utf-8") for p in (home.workdir / "logs").glob("batch_runner_*.log")]
    assert sum("✗ Cannot process the folder: input_dir 'nnn" in text for text in logs) == 1, logs


def test_job_ids_longer_than_any_job_id_are_not_found_before_any_query(
        batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    huge = "a" * 1_000_000
    with BatchClient(batch_server.address) as client:
        for call in (lambda i: client.get(i), lambda i: client.cancel(i),
                     lambda i: list(client.watch(i, timeout_s=10))):
            err = _refused(lambda c=call: c(huge))
            assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details()[:300])
            assert err.details() == "no job with an id of 1000000 characters: a job id has 16", err.details()[:300]
            for other, words in (("0123456789abcdef0", "an id of 17 characters"),  # a prefix longer than an id
                                 ("abc\x00def", "only letters and digits")):  # PostgreSQL refuses NUL in text
                err = _refused(lambda c=call, o=other: c(o))
                assert err.code() == grpc.StatusCode.NOT_FOUND and words in err.details(), err.details()
    _assert_serving_and_quiet(batch_home, batch_server)


def test_an_idempotency_key_names_one_request_and_has_a_length_limit(
        batch_home: BatchHome, batch_server: ServiceProcess, inference_server: ServiceProcess) -> None:
    write_images(batch_home.data / "keyed_a", 2, start=10)
    write_images(batch_home.data / "keyed_b", 2, start=20)
    other = contents(batch_home.data / "keyed_b")
    with BatchClient(batch_server.address) as client:
        first = client.submit("keyed_a", idempotency_key="K1")
        job = client.wait(first.job_id, timeout_s=60)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.min_confidence > 0  # the model's default, recorded
        # The same request again (the default min_confidence included): the same job, nothing new.
        assert client.submit("keyed_a", idempotency_key="K1").job_id == job.job_id
        assert client.submit("keyed_a", idempotency_key="K1", mode="move",
                             min_confidence=job.min_confidence).job_id == job.job_id
        for request, words in (({"input_dir": "keyed_b"}, "input_dir 'keyed_a', not 'keyed_b'"),
                               ({"input_dir": "keyed_a", "mode": "copy"}, "mode 'move', not 'copy'"),
                               ({"input_dir": "keyed_a", "recursive": True}, "recursive False, not True"),
                               ({"input_dir": "keyed_a", "output_dir": "elsewhere"}, "output_dir"),
                               ({"input_dir": "keyed_a", "min_confidence": 0.9}, "min_confidence")):
            err = _refused(lambda r=request: client.submit(idempotency_key="K1", **r))  # type: ignore[arg-type]
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, (request, err.details())
            assert f"idempotency key 'K1' already names job {job.job_id}" in err.details(), err.details()
            assert words in err.details(), (words, err.details())
        explicit = client.submit("keyed_b", idempotency_key="K2", mode="copy", min_confidence=0.6)
        assert client.submit("keyed_b", idempotency_key="K2", mode="copy", min_confidence=0.6).job_id == \
            explicit.job_id
        client.wait(explicit.job_id, timeout_s=60)

        for key in ("k" * 257, "k" * 3_000_000):
            err = _refused(lambda k=key: client.submit("keyed_a", idempotency_key=k))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details()[:300])
            assert err.details() == f"idempotency_key has {len(key)} characters: at most 256", err.details()[:300]
        err = _refused(lambda: client.submit("keyed_a", idempotency_key="a\x00b"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in err.details()
        longest = client.submit("keyed_a", idempotency_key="k" * 256)
        assert client.submit("keyed_a", idempotency_key="k" * 256).job_id == longest.job_id
        client.wait(longest.job_id, timeout_s=60)
    assert len(batch_home.query("SELECT job_id FROM jobs WHERE idempotency_key = ?", ("k" * 256,))) == 1
    assert not batch_home.query("SELECT job_id FROM jobs WHERE LENGTH(idempotency_key) > 256")

    # `--wait` on a reused key: the refusal and exit 2, never the old job followed to a success.
    reused = fashion(batch_home, inference_server.address, "submit", "keyed_b", "--key", "K1", "--wait",
                     "--address", batch_server.address)
    assert reused.returncode == 2, reused.stdout + reused.stderr
    assert f"error: ALREADY_EXISTS: idempotency key 'K1' already names job {job.job_id}" in reused.stderr
    assert "SUCCEEDED" not in reused.stdout, reused.stdout
    assert contents(batch_home.data / "keyed_b") == other  # K2 copied them; nothing moved
    _assert_serving_and_quiet(batch_home, batch_server)


def _last_run_metric(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("fashion_batch_last_run_timestamp_seconds "))


def test_a_cancelled_job_is_no_run_for_batch_health(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    """A job cancelled while it waits for the Inference service sorted nothing: batch health still says no
    run has finished (over gRPC, the CLI, --local, and the metric after a restart), and a later run counts."""
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 2)
    down = f"127.0.0.1:{free_port()}"
    batch = home.start(down)
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("inbox")
            wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_WAITING, what="WAITING")
            client.cancel(job.job_id)
            job = wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_CANCELLED, what="CANCELLED")
            assert job.processed == 0 and job.HasField("finished_at")
            stats, health = client.stats(), client.batch_health()
        remote = fashion(home, down, "health", "--address", batch.address)
    finally:
        batch.terminate()
    assert not stats.HasField("last_run_at") and stats.last_run_age_hours == 0, stats
    assert health.status == health_pb2.HEALTH_STATUS_UNHEALTHY
    assert health.message == "No batch run has finished yet" and not health.recent_run, health
    for report in (remote, fashion(home, down, "health", "--local")):
        assert report.returncode == 1, report.stdout + report.stderr
        assert "Recent Execution: ✗ UNHEALTHY\n  No batch run has finished yet" in report.stdout, report.stdout
    assert sorted(p.name for p in (home.data / "inbox").iterdir()) == sorted(images)

    # After a restart the metric is set from the jobs database: still no run.
    metrics_port = free_port()
    batch = home.start(inference_server.address, FASHION_BATCH_METRICS_PORT=str(metrics_port))
    try:
        assert _last_run_metric(metrics_port) == 0
        with BatchClient(batch.address) as client:
            done = client.wait(client.submit("inbox").job_id, timeout_s=60)
            assert done.state == pb.JOB_STATE_SUCCEEDED
            stats = client.stats()
            assert stats.last_run_at.ToNanoseconds() == done.finished_at.ToNanoseconds()
            assert client.batch_health().message == "Last run was 0.0 hours ago"
        deadline = time.monotonic() + 10
        while _last_run_metric(metrics_port) == 0:  # set when the job ended
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _last_run_metric(metrics_port) == pytest.approx(done.finished_at.ToNanoseconds() / 1e9, abs=1)
    finally:
        batch.terminate()

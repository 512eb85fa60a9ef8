"""The service logs' files (services.common.logs.RotatingFile) on a disk that fills up: a flush that cannot be
written loses its lines whole (never half a line), the failure is said once, and once the file can be written
again a warning in it says how many lines were lost and why."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fashion.client import BatchClient
from services.common.logs import RotatingFile
from tests.batch.conftest import fill, tmpfs
from tests.support import changed_command, free_port

pytestmark = pytest.mark.timeout(60)


def test_a_full_disk_loses_whole_lines_says_so_once_and_then_what_was_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "logs", "256k") as logs:
        reports: list[str] = []
        log_file = RotatingFile(logs / "api.log", 10 * 1024 * 1024, 10, logging.INFO, report=reports.append)
        log_file.write("[first] written\n")
        log_file.flush()
        filler = fill(logs)
        os.truncate(filler, filler.stat().st_size - 4096)  # a page free: the next flush is written in part
        for i in range(3):  # each flush larger than what is free
            for j in range(100):
                log_file.write(f"[burst {i}] line {j} " + "x" * 80 + "\n")
            log_file.flush()
        assert reports == [f"cannot write the log file {logs / 'api.log'}: No space left on device; its lines are "
                           "lost until it can be written again"]
        assert (logs / "api.log").read_bytes().endswith(b"\n")  # the part written was cut back
        filler.unlink()
        with caplog.at_level(logging.WARNING, logger="services.common.logs"):
            log_file.write("[after] written\n")
            log_file.flush()
        log_file.close()
        lines = (logs / "api.log").read_text(encoding="utf-8").splitlines()
    assert lines == ["[first] written", "[after] written"], lines
    assert [r.getMessage() for r in caplog.records] == [
        f"300 line(s) of {logs / 'api.log'} were lost while it could not be written (No space left on device)"]


@pytest.mark.parametrize("stdout", ["a reader that goes away", "closed"])
def test_a_service_whose_stdout_is_gone_serves_on_and_logs_to_its_files(tmp_path: Path, stdout: str) -> None:
    """`fashion serve batch | head -1`, or started with stdout closed: each log line gave a BrokenPipeError (or
    AttributeError) traceback on stderr; now stdout is dropped quietly and the log files go on."""
    port = free_port()
    env = {**os.environ, "FASHION_DATA_ROOT": "data", "FASHION_LOG_DIR": "logs", "FASHION_BATCH_HOST": "127.0.0.1",
           "FASHION_BATCH_PORT": str(port), "FASHION_BATCH_METRICS_PORT": "0", "FASHION_LOG_STDOUT": "true",
           "FASHION_BATCH_SCHEDULE": "", "OTEL_SDK_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
    closed = stdout == "closed"
    proc = subprocess.Popen(changed_command([sys.executable, "-m", "services.batch"], stdout_closed=closed),
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL if closed else subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        if not closed:
            assert proc.stdout is not None
            proc.stdout.readline()
            proc.stdout.close()  # the reader goes away
        deadline = time.monotonic() + 30
        with BatchClient(f"127.0.0.1:{port}") as client:
            while True:
                try:
                    for _ in range(20):  # access lines, each to stdout and the log file
                        client.list(1)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.2)
        time.sleep(0.5)  # the writer's burst
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()[-2000:]
    log = (tmp_path / "logs" / "batch_service.log").read_text(encoding="utf-8")
    assert log.count("method=/fashion.v1.BatchService/ListJobs status=OK") >= 20, log[-2000:]


def test_a_rotation_that_fails_is_said_once_and_loses_no_line(tmp_path: Path) -> None:
    """The rename of a rotation refused (here `api.log.1` is a folder in the way): each line tried the rotation
    again and raised, printing a traceback and losing the line. Now it is said once, the file grows on, and
    the next rotation that works goes back to the rule."""
    (tmp_path / "api.log.1").mkdir()
    (tmp_path / "api.log.1" / "in the way").touch()
    reports: list[str] = []
    log_file = RotatingFile(tmp_path / "api.log", 100, 1, logging.INFO, report=reports.append)
    for i in range(10):
        log_file.write(f"line {i} " + "x" * 40 + "\n")
        log_file.flush()
    assert reports == [f"cannot rotate the log file {tmp_path / 'api.log'}: Is a directory; it grows past "
                       "100 bytes until it can be rotated"], reports
    assert len((tmp_path / "api.log").read_text().splitlines()) == 10
    (tmp_path / "api.log.1" / "in the way").unlink()
    (tmp_path / "api.log.1").rmdir()
    log_file.write("after\n")
    log_file.close()
    assert (tmp_path / "api.log").read_text() == "after\n" and log_file.rotation_failure is None

"""The service logs' files (services.common.logs.RotatingFile) on a disk that fills up: a flush that cannot be
written loses its lines whole (never half a line), the failure is said once, and once the file can be written
again a warning in it says how many lines were lost and why."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from services.common.logs import RotatingFile
from tests.batch.conftest import fill, tmpfs

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

"""Scheduled runs that cannot happen, in the Batch service as it runs (its own process): a schedule that
never comes due stops the start with the reason (exit 2), and an inbox the file system refuses makes each
scheduled run say why in its runner log and the service log, while the service keeps serving."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.batch.conftest import BatchHome
from tests.support import ServiceProcess, health_status, start_service

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("schedule", ["0 2 30 2 *", "0 2 31 4 *", "99999999999d"])
def test_a_schedule_that_never_comes_due_stops_the_start_with_the_reason(tmp_path: Path, schedule: str) -> None:
    home = BatchHome(tmp_path)
    svc = start_service("services.batch", home.workdir, home.env("127.0.0.1:1", FASHION_BATCH_SCHEDULE=schedule),
                        "127.0.0.1:1")
    try:
        assert svc.proc.wait(timeout=30) == 2, svc.output()
    finally:
        svc.kill()
    assert f"FASHION_BATCH_SCHEDULE: batch schedule {schedule!r} never comes due" in svc.output(), svc.output()
    assert "Traceback" not in svc.output(), svc.output()


def test_an_inbox_name_too_long_makes_each_scheduled_run_say_why(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    inbox = "i" * 300
    batch = home.start(inference_server.address, FASHION_BATCH_SCHEDULE="every 1s", FASHION_BATCH_INBOX=inbox)
    try:
        deadline = time.monotonic() + 30
        while len(said := [p.read_text(encoding="utf-8") for p in (home.workdir / "logs").glob("batch_runner_*.log")
                           if "Next run: " in p.read_text(encoding="utf-8")]) < 2:
            assert time.monotonic() < deadline, batch.output()
            time.sleep(0.1)
        assert health_status(batch.address, "fashion.v1.BatchService") == "SERVING"
    finally:
        batch.terminate()
    for text in said:
        assert f"✗ Cannot process the inbox: inbox '{inbox}' cannot be used: File name too long" in text, text
    errors = (home.workdir / "logs" / "batch_service_errors.log").read_text(encoding="utf-8")
    assert "ERROR services.batch.schedule" in errors and "Scheduled run skipped: inbox 'iii" in errors, errors
    assert "Traceback" not in batch.output() and "never retrieved" not in batch.output(), batch.output()

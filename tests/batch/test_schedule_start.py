"""Scheduled runs that cannot happen, in the Batch service as it runs (its own process): a schedule that
never comes due stops the start with the reason (exit 2), and an inbox the file system refuses makes each
scheduled run say why in its runner log and the service log, while the service keeps serving."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.batch.conftest import BatchHome, write_images
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


def test_after_a_restart_a_scheduled_run_still_going_makes_the_next_ones_skip(tmp_path: Path) -> None:
    """A scheduled job that waits for an Inference service that is down, the Batch service killed and started
    again: the job resumes, and every run that comes due meanwhile is skipped, naming it (a second job for the
    same inbox was submitted at the first due time after the restart)."""
    home = BatchHome(tmp_path)
    write_images(home.data / "inbox", 3)
    schedule = {"FASHION_BATCH_SCHEDULE": "every 1s", "FASHION_BATCH_CATCH_UP": "false"}

    def scheduled_jobs() -> list[tuple[str, str]]:
        return home.query("SELECT job_id, state FROM jobs WHERE trigger = 'schedule'")

    def runner_logs_done() -> list[str]:
        return [text for p in (home.workdir / "logs").glob("batch_runner_*.log")
                if "Next run: " in (text := p.read_text(encoding="utf-8"))]

    batch = home.start("127.0.0.1:1", **schedule)  # nothing listens there: the job waits for it
    try:
        deadline = time.monotonic() + 30
        while not scheduled_jobs():
            assert time.monotonic() < deadline, batch.output()
            time.sleep(0.1)
    finally:
        batch.kill()
    ((job_id, _),) = scheduled_jobs()
    logs_before = len(runner_logs_done())
    batch = home.start("127.0.0.1:1", **schedule)
    try:
        deadline = time.monotonic() + 30
        while len(runner_logs_done()) < logs_before + 3:
            assert time.monotonic() < deadline, batch.output()
            time.sleep(0.1)
    finally:
        batch.terminate()
    assert [job for job, _ in scheduled_jobs()] == [job_id], batch.output()
    skipped = [text for text in runner_logs_done() if "this run is skipped" in text]
    assert len(skipped) >= 3 and all(f"✗ Previous run (job {job_id}) is still " in text for text in skipped), skipped

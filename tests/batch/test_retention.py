"""Per-run files older than FASHION_RETENTION_DAYS are deleted by the Batch service: batch and batch_runner
logs, CSV results and JSON summaries; the service's own rotating logs, newer runs and anything else in
those folders stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.batch.reports import RUN_LOG_PATTERNS
from services.common.retention import prune_files
from tests.batch.conftest import BatchHome
from tests.support import ServiceProcess

DAY_S = 86400


def _file(path: Path, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    then = time.time() - age_days * DAY_S
    os.utime(path, (then, then))
    return path


def _wait_gone(paths: list[Path], svc: ServiceProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in paths):
        assert time.monotonic() < deadline, ([p for p in paths if p.exists()], svc.output())
        time.sleep(0.1)


def test_old_run_files_are_pruned_and_nothing_else(tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    logs, results = home.workdir / "logs", home.results()
    old = [_file(logs / "batch_20260101_020000.log", 40), _file(logs / "batch_runner_20260101_020000.log", 40),
           _file(logs / "batch_20260101_020000.log.1", 40),
           _file(results / "batch_results_20260101_020000.csv", 40),
           _file(results / "batch_summary_20260101_020000.json", 40)]
    kept = [_file(logs / "batch_20261101_020000.log", 20), _file(results / "batch_results_20261101_020000.csv", 20),
            _file(logs / "batch_service.log", 40), _file(logs / "batch_service_errors.log.3", 40),
            _file(results / "notes.txt", 40), _file(home.data / "inbox" / "batch_results_20260101_020000.csv", 40)]
    svc = home.start(inference_server.address, FASHION_RETENTION_DAYS="30")
    try:
        _wait_gone(old, svc)
    finally:
        svc.terminate()
    assert all(p.exists() for p in kept), [p for p in kept if not p.exists()]
    # The log names the folders as configured, not as the descriptor the sweep went through.
    assert "Deleted 2 files older than 30 days from results/batch_results" in svc.output(), svc.output()


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    ancient = _file(tmp_path / "batch_20200101_020000.log", 2000)
    assert prune_files(tmp_path, RUN_LOG_PATTERNS, 0) == 0 and ancient.exists()
    assert prune_files(tmp_path, RUN_LOG_PATTERNS, 1) == 1 and not ancient.exists()

"""The run's results (CSV, JSON summary) and the jobs database are never written through a symbolic link
that someone who may write to the data root could have made: with FASHION_RESULTS_DIR=data/results (inside
the data root, as in the containers) a link there is refused with the reason, never followed, and nothing
outside the data root is created or changed. The operator's own links outside the data root are followed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from services.batch.records import STAMP_FORMAT
from tests.batch.conftest import BatchHome, contents, files_under, read_csv, read_summary, write_images
from tests.support import ServiceProcess

FASHION = str(Path(sys.executable).with_name("fashion"))
pytestmark = pytest.mark.timeout(180)
EXIT_FAILED, EXIT_ERROR = 1, 2  # `fashion batch run`: the job ended FAILED; refused before any job ran


def fashion_run(home: BatchHome, inference: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "250", **home.env(inference, FASHION_RESULTS_DIR="data/results"), **env}
    return subprocess.run([FASHION, "batch", "run", "data/inbox"], cwd=home.workdir, env=full_env,
                          capture_output=True, text=True, timeout=120)


def outside_folder(home: BatchHome) -> Path:
    """A folder outside the data root holding one file that must stay as it is."""
    outside = home.workdir / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious\n")
    return outside


def link_outside(home: BatchHome, swapped: str) -> tuple[Path, dict[str, str]]:
    """The folder `swapped` (under the data root) made a link to outside_folder(); that folder and what it
    holds, to compare with afterwards."""
    outside = outside_folder(home)
    link = home.data / swapped
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    return outside, contents(outside)


@pytest.mark.parametrize("swapped", ["results", "results/batch_results"])
def test_a_results_folder_swapped_for_a_link_is_refused_and_nothing_is_written_outside(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess, swapped: str) -> None:
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 4)
    outside, before = link_outside(home, swapped)

    run = fashion_run(home, inference_server.address)

    assert run.returncode == EXIT_FAILED, run.stdout + run.stderr
    assert "FAILED" in run.stdout, run.stdout
    reason = f"could not write the job's results: cannot write in the results folder data/results/batch_results: " \
             f"data/{swapped} is now a symbolic link (links are not followed)"
    assert reason in " ".join(run.stdout.split()), run.stdout  # the table wraps long lines
    assert contents(outside) == before  # nothing written, nothing created through the link
    assert (home.data / swapped).is_symlink()
    assert sorted(files_under(home.output)) == sorted(images)  # the images themselves were sorted
    state, error = home.query("SELECT state, error FROM jobs")[0]
    assert state == "failed" and reason.removeprefix("could not write the job's results: ") in error
    run_log = next((home.workdir / "logs").glob("batch_2*.log")).read_text(encoding="utf-8")
    assert "BATCH PROCESSING FAILED" in run_log and "is now a symbolic link" in run_log


def test_links_planted_under_every_guessable_report_name_are_never_followed(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    """The CSV, the summary and their temporary files for every time stamp of the next minutes are links to a
    file outside the data root: the run writes its reports as files of their own, the victim is untouched."""
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 5)
    victim = outside_folder(home) / "victim.txt"
    results = home.data / "results" / "batch_results"
    results.mkdir(parents=True)
    now = datetime.now()
    stamps = [(now + timedelta(seconds=s)).strftime(STAMP_FORMAT) for s in range(-5, 180)]
    for stamp in stamps:
        for name in (f"batch_results_{stamp}.csv", f"batch_summary_{stamp}.json"):
            for planted in (name, f".{name}.tmp", f".{name}.1.tmp", f"{name}.tmp"):
                (results / planted).symlink_to(victim)

    run = fashion_run(home, inference_server.address)

    assert run.returncode == 0, run.stdout + run.stderr
    assert victim.read_text() == "precious\n"
    job_id, stamp = home.query("SELECT job_id, stamp FROM jobs")[0]
    assert stamp in stamps
    csv_file, summary_file = results / f"batch_results_{stamp}.csv", results / f"batch_summary_{stamp}.json"
    for written in (csv_file, summary_file):
        assert written.is_file() and not written.is_symlink() and written.stat().st_nlink == 1, written
    assert sorted(r["filename"] for r in read_csv(csv_file)) == sorted(images)
    summary = read_summary(summary_file)
    assert summary["job_id"] == job_id and summary["total_processed"] == len(images)
    assert victim.read_text() == "precious\n"


def test_the_operators_own_link_to_a_results_folder_outside_the_data_root_is_followed(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """FASHION_RESULTS_DIR=results next to the data root, a link the operator made to another disk."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 3)
    disk = home.workdir / "disk"
    disk.mkdir()
    (home.workdir / "results").symlink_to(disk, target_is_directory=True)

    run = fashion_run(home, inference_server.address, FASHION_RESULTS_DIR="results")

    assert run.returncode == 0, run.stdout + run.stderr
    csv_file = next((disk / "batch_results").glob("batch_results_*.csv"))
    assert sorted(r["filename"] for r in read_csv(csv_file)) == sorted(images)
    assert len(list((disk / "batch_results").glob("batch_summary_*.json"))) == 1


@pytest.mark.parametrize("swapped", [".batch", ".batch/locks"])
def test_a_jobs_database_folder_swapped_for_a_link_is_refused_and_nothing_is_created_outside(
        tmp_path: Path, inference_server: ServiceProcess, swapped: str) -> None:
    home = BatchHome(tmp_path)  # the SQLite file under the data root
    images = write_images(home.data / "inbox", 3)
    outside, before = link_outside(home, swapped)

    run = fashion_run(home, inference_server.address)

    assert run.returncode == EXIT_ERROR, run.stdout + run.stderr
    assert (f"error: the jobs database folder data/{swapped} is a symbolic link: refusing to create or open the "
            "jobs database through it") in run.stderr, run.stderr
    assert contents(outside) == before
    assert sorted(p.name for p in (home.data / "inbox").iterdir()) == sorted(images)  # no job ran


def test_retention_never_deletes_through_a_results_folder_swapped_for_a_link(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """Old results are deleted by the Batch service's sweep; one outside, reached through a link under the data
    root, stays (the sweep says why it skipped the folder)."""
    home = BatchHome(tmp_path)
    outside = outside_folder(home)
    old_result = outside / "batch_results_20200101_020000.csv"
    old_result.write_text("kept\n")
    old_log = home.workdir / "logs" / "batch_20200101_020000.log"  # deleted by the same sweep: it ran
    old_log.parent.mkdir()
    old_log.write_text("x")
    for path in (old_result, old_log):
        os.utime(path, (0, 0))
    (home.data / "results").mkdir(parents=True)
    (home.data / "results" / "batch_results").symlink_to(outside, target_is_directory=True)

    svc = home.start(inference_server.address, FASHION_RETENTION_DAYS="30", FASHION_RESULTS_DIR="data/results")
    try:
        deadline = time.monotonic() + 30
        while old_log.exists() or ("Old results not deleted" not in svc.output() and old_result.exists()):
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.1)
    finally:
        svc.terminate()
    assert old_result.read_text() == "kept\n"
    assert "data/results/batch_results is now a symbolic link" in svc.output()

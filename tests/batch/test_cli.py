"""`fashion batch ...` as a user runs it (the installed `fashion` script, in its own process):
embedded runs for cron, jobs on the Batch service, the health check; and scheduled runs. On each
jobs database (SQLite, PostgreSQL) where the database matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from croniter import croniter

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import BatchHome, files_under, fill, read_csv, tmpfs, wait_for, write_images
from tests.support import ServiceProcess, free_port, start_service

FASHION = str(Path(sys.executable).with_name("fashion"))
pytestmark = pytest.mark.timeout(120)


def fashion(home: BatchHome, inference: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", **home.env(inference), **env}
    return subprocess.run([FASHION, "batch", *args], cwd=home.workdir, env=full_env, capture_output=True,
                          text=True, timeout=90)


def test_embedded_run_sorts_a_folder_without_a_batch_server_then_health_reports_it(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 12)
    (home.data / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    never = fashion(home, inference_server.address, "health", "--local")
    assert never.returncode == 1, never.stdout + never.stderr
    assert "Recent Execution: ✗ UNHEALTHY\n  No batch run has finished yet" in never.stdout

    run = fashion(home, inference_server.address, "run", "data/inbox")  # a local path inside the data root
    assert run.returncode == 0, run.stdout + run.stderr
    for words in ("SUCCEEDED", "Images found", "│ 13 ", "Successful", "Categories", "Failed files", "broken.jpg",
                  "Results CSV", "img/s"):
        assert words in run.stdout, (words, run.stdout)
    assert sorted(files_under(home.output)) == sorted([*images, "broken.jpg"])
    assert not any((home.data / "inbox").iterdir())
    csv_file = next((home.workdir / "results" / "batch_results").glob("batch_results_*.csv"))
    assert sorted(r["filename"] for r in read_csv(csv_file)) == sorted([*images, "broken.jpg"])
    # Like the scheduler's runs, a run from cron leaves its batch_runner log.
    runner_log = _one_new(home.workdir / "logs", "batch_runner_*.log", set())
    job_id = next(line.split()[-1] for line in runner_log.read_text(encoding="utf-8").splitlines()
                  if "Started batch job" in line)
    text = runner_log.read_text(encoding="utf-8")
    for line in ("BATCH RUNNER STARTED", "Trigger: fashion batch run", "Input: data/inbox",
                 "Output: data/processed_batches", f"Batch job {job_id} SUCCEEDED: 13 images processed (",
                 "✓ Batch completed successfully"):
        assert line in text, (line, text)

    health = fashion(home, inference_server.address, "health", "--local")
    assert health.returncode == 0, health.stdout + health.stderr
    lines = health.stdout.splitlines()
    assert lines[:3] == ["=" * 60, "BATCH PROCESSING HEALTH CHECK", "=" * 60]
    assert "Recent Execution: ✓ HEALTHY" in lines and "  Last run was 0.0 hours ago" in lines
    assert "Recent Errors: ⚠ 1 errors in the last 24 hours" in lines
    assert "Last 7 Days Statistics:" in lines and "  Total runs: 1" in lines
    assert "  Images processed: 13" in lines and "  Failed: 1" in lines
    stale = fashion(home, inference_server.address, "health", "--local", "--max-age-hours", "0")
    assert stale.returncode == 1 and "Recent Execution: ✗ UNHEALTHY" in stale.stdout

    before = set((home.workdir / "logs").glob("batch_runner_*.log"))
    escape = fashion(home, inference_server.address, "run", "../elsewhere")
    assert escape.returncode == 2 and "outside the data root" in escape.stderr
    assert escape.stdout == "" and escape.stderr.count("\n") == 1, escape  # the reason alone, no progress bar
    refused = _one_new(home.workdir / "logs", "batch_runner_*.log", before).read_text(encoding="utf-8")
    assert "✗ Cannot process the folder: " in refused and "outside the data root" in refused


def _one_new(folder: Path, pattern: str, before: set[Path]) -> Path:
    """The one file matching `pattern` that is not in `before` (per-run logs are flushed when closed)."""
    new = sorted(set(folder.glob(pattern)) - before)
    assert len(new) == 1, new
    return new[0]


def test_submit_wait_status_list_watch_cancel_health_against_the_service(
        batch_home: BatchHome, batch_server: ServiceProcess, inference_server: ServiceProcess) -> None:
    images = write_images(batch_home.data / "drop", 8)
    address = ("--address", batch_server.address)
    submitted = fashion(batch_home, inference_server.address, "submit", "drop", "--wait", *address)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "SUCCEEDED" in submitted.stdout and "│ Processed    │ 8 " in submitted.stdout
    assert sorted(files_under(batch_home.output)) == sorted(images)

    listed = fashion(batch_home, inference_server.address, "list", "--json", *address)
    jobs = json.loads(listed.stdout)
    assert listed.returncode == 0 and len(jobs) == 1 and jobs[0]["state"] == "succeeded"
    job_id = jobs[0]["job_id"]
    table = fashion(batch_home, inference_server.address, "list", *address).stdout  # at 80 columns: not a terminal
    assert max(map(len, table.splitlines())) <= 80 and f"{job_id[:8]}  succeeded" in table, table
    short = fashion(batch_home, inference_server.address, "status", job_id[:5], *address)
    assert short.returncode == 2 and "a prefix of a job id needs at least 6 characters" in short.stderr
    status = json.loads(fashion(batch_home, inference_server.address, "status", job_id, "--json", *address).stdout)
    assert (status["processed"], status["trigger"]) == (8, "api")
    watched = fashion(batch_home, inference_server.address, "watch", job_id, *address)
    assert watched.returncode == 0 and f"Batch job {job_id}: SUCCEEDED" in watched.stdout
    cancel = fashion(batch_home, inference_server.address, "cancel", job_id, *address)
    assert cancel.returncode == 2 and "FAILED_PRECONDITION" in cancel.stderr and "already ended" in cancel.stderr
    assert fashion(batch_home, inference_server.address, "status", job_id, *address).returncode == 0
    unknown = fashion(batch_home, inference_server.address, "status", "feedfacefeedface", *address)
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr

    health = fashion(batch_home, inference_server.address, "health", *address)
    assert health.returncode == 0 and "Recent Execution: ✓ HEALTHY" in health.stdout, health.stdout
    assert "  Total runs: 1" in health.stdout and "Recent Errors: ✓ No errors detected" in health.stdout
    down = fashion(batch_home, inference_server.address, "health", "--address", f"127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "did not answer" in down.stderr
    down = fashion(batch_home, inference_server.address, "health", "--json", "--address", f"127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "did not answer" in down.stderr  # and a document for `| jq -e .healthy`
    assert json.loads(down.stdout) == {"healthy": False, "status": "unknown", "error": down.stderr[7:].strip()}


def test_scheduled_runs_process_the_inbox_with_a_runner_log(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path, jobs_database)
    images = write_images(home.data / "inbox", 3)
    batch = home.start(inference_server.address, FASHION_BATCH_SCHEDULE="every 1s")
    try:
        with BatchClient(batch.address) as client:
            deadline = time.monotonic() + 30
            while not (scheduled := [j for j in client.list(100) if j.trigger == "schedule"]):
                assert time.monotonic() < deadline, batch.output()
                time.sleep(0.05)
            job = wait_for(client, scheduled[-1].job_id, lambda j: j.state == pb.JOB_STATE_SUCCEEDED)
            while not any("✓ Batch completed" in p.read_text(encoding="utf-8")
                          for p in (home.workdir / "logs").glob("batch_runner_*.log")):
                assert time.monotonic() < deadline, "the runner log never reported the end of the job"
                time.sleep(0.05)
    finally:
        batch.terminate()
    assert job.input_dir == "inbox" and job.processed == 3
    assert sorted(files_under(home.output)) == sorted(images)
    runner_logs = sorted((home.workdir / "logs").glob("batch_runner_*.log"))
    text = next(p.read_text(encoding="utf-8") for p in runner_logs if job.job_id in p.read_text(encoding="utf-8"))
    for line in ("BATCH RUNNER STARTED", "Schedule: every 1 seconds", "Inbox: data/inbox",
                 f"Started batch job {job.job_id}", f"Batch job {job.job_id} SUCCEEDED: 3 images processed",
                 "✓ Batch completed successfully", "Next run: "):
        assert line in text, (line, text)


def test_hostile_names_are_shown_as_they_are_never_as_markup_or_terminal_codes(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """File and folder names that look like rich markup or carry escape sequences: the summary lists them
    literally (brackets kept, controls escaped) and the command's exit code is the job's, not a crash."""
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    names = ["a[/]x.png", "[bold red]styled.png", "t\x1b]2;owned\x07\x1b[2J.png"]  # the first in folder "a["
    for name in names:
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = fashion(home, inference_server.address, "run", "-r", "inbox")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MarkupError" not in run.stderr and "\x1b" not in run.stdout, run.stdout + run.stderr
    for shown in ("a[/]x.png", "[bold red]styled.png", "t\\x1b]2;owned\\x07\\x1b[2J.png"):
        assert shown in run.stdout, (shown, run.stdout)
    listed = fashion(home, inference_server.address, "health", "--local")
    assert listed.returncode == 0 and "\x1b" not in listed.stdout, listed.stdout + listed.stderr
    failed = home.output / "_failed"
    env = {**os.environ, "COLUMNS": "200", **home.env(inference_server.address)}
    classify = subprocess.run([FASHION, "classify", *(str(p.relative_to(failed)) for p in failed.rglob("*.png"))],
                              cwd=failed, env=env, capture_output=True, text=True, timeout=90)
    assert classify.returncode == 1 and "MarkupError" not in classify.stderr, classify.stdout + classify.stderr
    assert "[bold red]styled.png" in classify.stdout and "\x1b" not in classify.stdout, classify.stdout


def test_a_folder_name_cannot_forge_a_line_of_the_service_log(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The service log quotes folder names and errors: one with a newline and a fake log line in it stays
    on its own line, escaped (the log's readers split on lines: a forged "SUCCEEDED" would mislead them)."""
    home = BatchHome(tmp_path)
    folder = "in\n[2026-01-01 00:00:00] INFO services.batch.runner [trace_id=-] Job 0000 SUCCEEDED"
    write_images(home.data / folder, 1)
    batch = home.start(inference_server.address)
    try:
        with BatchClient(batch.address) as client:
            job = client.submit(folder)
            wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_SUCCEEDED)
            with pytest.raises(grpc.RpcError) as refused:
                client.submit(folder + "\n-gone")
    finally:
        batch.terminate()
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value
    log = (home.workdir / "logs" / "batch_service.log").read_text(encoding="utf-8")
    assert not [line for line in log.splitlines() if line.startswith("[2026-01-01")], log
    assert "submitted (api): in\\n[2026-01-01 00:00:00] INFO" in log, log


def test_an_output_folder_yet_to_be_made_is_where_the_path_says(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """`--output data/sorted` (a path on this machine, its parent there, the folder not yet): the images land
    in data/sorted, not in data/data/sorted; a subfolder named without a path stays under the data root."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 2)
    run = fashion(home, inference_server.address, "run", "inbox", "--output", "data/sorted")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_under(home.data / "sorted")) == sorted(images) and not (home.data / "data").exists()
    more = write_images(home.data / "inbox", 1, start=5)
    run = fashion(home, inference_server.address, "run", "inbox", "--output", "elsewhere")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(files_under(home.data / "elsewhere")) == sorted(more)


def _scheduled_runs_started(batch: ServiceProcess, offset: int) -> None:
    """Until the service has decided about a missed run (it logs the schedule just after), in its output
    after `offset` characters (earlier processes' output comes first)."""
    deadline = time.monotonic() + 30
    while "Scheduled runs of inbox" not in batch.output()[offset:]:
        assert time.monotonic() < deadline, batch.output()
        time.sleep(0.05)


def test_the_last_scheduled_run_missed_while_the_service_was_down_runs_at_start(
        tmp_path: Path, jobs_database: str | None, inference_server: ServiceProcess) -> None:
    """A nightly run that came due while the service was down runs once at start (FASHION_BATCH_CATCH_UP);
    not on the very first start of a schedule, not twice, and not when turned off."""
    home = BatchHome(tmp_path, jobs_database)
    monthly = "0 0 1 * *"  # due last on the 1st of this month, so that no run comes due during the test
    due = croniter(monthly, datetime.now()).get_prev(datetime)

    def scheduled() -> list[tuple[str, float]]:
        return [(r[0], float(r[1])) for r in home.query(
            "SELECT job_id, created_at FROM jobs WHERE trigger = 'schedule' ORDER BY created_at")]

    earlier = 0

    def start_and_stop(catching_up: bool = False, **extra: str) -> str:
        """This start's output, once its catch-up run (when `catching_up`) has ended and said so."""
        nonlocal earlier
        before = len(scheduled()) if catching_up else 0
        batch = home.start(inference_server.address, FASHION_BATCH_SCHEDULE=monthly, **extra)
        try:
            _scheduled_runs_started(batch, earlier)
            deadline = time.monotonic() + 60
            while catching_up and not (len(scheduled()) > before and "✓ Batch completed" in "".join(
                    p.read_text(encoding="utf-8") for p in (home.workdir / "logs").glob("batch_runner_*.log"))):
                assert time.monotonic() < deadline, batch.output()
                time.sleep(0.05)
            with BatchClient(batch.address) as client:
                for job_id, _ in scheduled():
                    wait_for(client, job_id, lambda j: j.state == pb.JOB_STATE_SUCCEEDED)
        finally:
            batch.terminate()
        output, earlier = batch.output()[earlier:], len(batch.output())
        return output

    images = write_images(home.data / "inbox", 2)
    first = start_and_stop()
    assert scheduled() == [] and "did not happen" not in first, first
    # A scheduled run the day before the 1st (the inbox's images still waiting): the 1st's run was missed.
    before = due.timestamp() - 86400
    home.query("INSERT INTO jobs (job_id, state, trigger, input_dir, output_dir, mode, recursive, created_at, "
               "started_at, finished_at) VALUES ('0ld5c4ed0000aaaa', 'succeeded', 'schedule', 'inbox', "
               "'processed_batches', 'move', 0, ?, ?, ?) RETURNING job_id", (before, before, before + 1))
    off = start_and_stop(FASHION_BATCH_CATCH_UP="false")
    assert len(scheduled()) == 1 and "did not happen" not in off, off
    caught_up = start_and_stop(catching_up=True)
    assert (f"The scheduled run due at {due:%Y-%m-%d %H:%M:%S} did not happen (the service was down): "
            "running it now") in caught_up
    jobs = scheduled()
    assert len(jobs) == 2 and jobs[1][1] > time.time() - 120, jobs
    assert sorted(files_under(home.output)) == sorted(images)
    runner_log = next(p.read_text(encoding="utf-8") for p in (home.workdir / "logs").glob("batch_runner_*.log")
                      if jobs[1][0] in p.read_text(encoding="utf-8"))
    assert f"Catching up the run due at {due:%Y-%m-%d %H:%M:%S}, missed while the service was down" in runner_log
    assert "✓ Batch completed successfully" in runner_log
    again = start_and_stop()
    assert len(scheduled()) == 2 and "did not happen" not in again, again


def test_a_bad_schedule_stops_the_service_at_start_with_the_reason(tmp_path: Path) -> None:
    home = BatchHome(tmp_path)
    svc = start_service("services.batch", home.workdir, home.env("127.0.0.1:1", FASHION_BATCH_SCHEDULE="at noon"),
                        "127.0.0.1:1")
    assert svc.proc.wait(timeout=30) == 2
    assert "FASHION_BATCH_SCHEDULE" in svc.output() and "'at noon' is neither a 5-field cron" in svc.output()


def test_logs_inside_the_data_root_are_refused_by_the_run_and_the_service(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """Log files are opened by path: an uploader could swap a log folder inside the data root for a link and
    have the service write where it points. Both the CLI run and the service refuse to start, naming both
    settings, before touching anything."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 2)
    inside = {"FASHION_LOG_DIR": "data/logs"}
    run = fashion(home, inference_server.address, "run", "inbox", **inside)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "FASHION_LOG_DIR (data/logs) lies inside FASHION_DATA_ROOT (data)" in run.stderr, run.stderr
    assert sorted(p.name for p in (home.data / "inbox").iterdir()) == sorted(images)
    assert not (home.data / "logs").exists()
    service = subprocess.run([sys.executable, "-m", "services.batch"], cwd=home.workdir, capture_output=True,
                             text=True, timeout=60, env={**os.environ, **home.env(inference_server.address),
                                                        "FASHION_LOG_DIR": str(home.data / "sub" / ".." / "logs")})
    assert service.returncode == 2 and "lies inside FASHION_DATA_ROOT" in service.stderr, service.stderr
    assert not (home.data / "logs").exists()


def test_list_fits_80_columns_with_every_column_whole_and_the_input_cut_last(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """Cron mails and pipes get 80 columns: the job id, state, time and figures stay whole, the input folder
    is cut with an ellipsis (rich shrank every column before: `e32981…  succeed…  12-03 14:…`)."""
    home = BatchHome(tmp_path)
    folder = "catalog/2026/december/new-arrivals-from-the-spring-collection-photographed-in-studio-b"
    write_images(home.data / folder, 2)
    batch = home.start(inference_server.address)
    try:
        submitted = fashion(home, inference_server.address, "submit", folder, "--wait", "--json",
                            "--address", batch.address)
        job = json.loads(submitted.stdout)
        table = fashion(home, inference_server.address, "list", "--address", batch.address, COLUMNS="80").stdout
    finally:
        batch.terminate()
    lines = table.splitlines()
    assert max(map(len, lines)) <= 80, table
    assert lines[0].split()[:9] == ["job", "state", "created", "images", "ok", "uncertain", "failed", "took",
                                    "input"], table
    [row] = [line for line in lines if line.startswith(job["job_id"][:8])]
    assert row.split()[1:2] == ["succeeded"] and " 2/2 " in row and row.rstrip().endswith("catalog…"), row


def test_a_reader_that_goes_away_does_not_turn_a_command_into_a_failure(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """`fashion batch run inbox | true` (the reader gone before the first line): the job still sorts every
    image and the exit code is the job's (0), not rich's 1 for a broken pipe, which cron reads as failed."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 6)
    env = {**os.environ, "COLUMNS": "200", **home.env(inference_server.address)}
    for command in (f"{FASHION} batch run inbox", f"{FASHION} batch run inbox --json",
                    f"{FASHION} batch health --local"):
        piped = subprocess.run(["bash", "-c", f"sleep 0.2 | {command} | true; echo ${{PIPESTATUS[1]}}"],
                               cwd=home.workdir, env=env, capture_output=True, text=True, timeout=120)
        assert piped.stdout.strip() == "0", (command, piped.stdout, piped.stderr)
        assert "Traceback" not in piped.stderr and "Broken pipe" not in piped.stderr, piped.stderr
    assert sorted(files_under(home.output)) == sorted(images)


def test_a_run_that_resumes_an_interrupted_job_reports_it_too(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The same command again after a crash finishes the interrupted job first: its summary is shown (and in
    --json under resumed_jobs) and its outcome counts in the exit code; before, only the new, empty job's was."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 5)
    crashed = fashion(home, inference_server.address, "run", "inbox", FASHION_BATCH_FAILPOINT="planned")
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    again = fashion(home, inference_server.address, "run", "inbox", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    document = json.loads(again.stdout)
    assert (document["total"], document["state"]) == (0, "succeeded"), document
    [resumed] = document["resumed_jobs"]
    assert (resumed["state"], resumed["processed"], resumed["total"]) == ("succeeded", 5, 5), resumed
    assert sorted(files_under(home.output)) == sorted(images)
    more = write_images(home.data / "inbox", 2, start=10)
    crashed = fashion(home, inference_server.address, "run", "inbox", FASHION_BATCH_FAILPOINT="planned")
    assert crashed.returncode == -9
    text = fashion(home, inference_server.address, "run", "inbox")
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.count("Batch job ") == 2 and "│ Processed    │ 2 " in text.stdout, text.stdout
    assert sorted(files_under(home.output)) == sorted([*images, *more])


def test_status_of_a_cancelled_job_exits_1_as_documented(tmp_path: Path) -> None:
    """A job waiting for an Inference service that is down, cancelled: `status` says so with exit 1 (it was 0,
    while `watch` and the documentation said 1 for failed or cancelled)."""
    home = BatchHome(tmp_path)
    write_images(home.data / "inbox", 2)
    down = f"127.0.0.1:{free_port()}"
    batch = home.start(down)
    try:
        address = ("--address", batch.address)
        job = json.loads(fashion(home, down, "submit", "inbox", "--json", *address).stdout)
        cancelled = fashion(home, down, "cancel", job["job_id"], *address)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        status = fashion(home, down, "status", job["job_id"], *address)
    finally:
        batch.terminate()
    assert status.returncode == 1 and "CANCELLED" in status.stdout, status.stdout + status.stderr


def test_ctrl_c_after_the_job_ended_reports_its_outcome_not_an_interruption(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """Ctrl-C (SIGINT) landing while `fashion batch run` closes, its job already succeeded: the command reports
    the job (exit 0, its summary); before, it said "Interrupted: run the same command again" and exited 130,
    which cron mails as a failure, and the next run found nothing to resume."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 4)
    env = {**os.environ, "COLUMNS": "200", **home.env(inference_server.address), "FASHION_BATCH_STOP_AT": "ended"}
    proc = subprocess.Popen([FASHION, "batch", "run", "inbox", "--json"], cwd=home.workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the run ended before the job did: {os.waitstatus_to_exitcode(status)}"
        os.kill(proc.pid, signal.SIGINT)  # pending while stopped: delivered as the run goes on
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "Interrupted" not in err, err
    document = json.loads(out)
    assert (document["state"], document["processed"]) == ("succeeded", 4), document
    assert sorted(files_under(home.output)) == sorted(images)


def test_a_run_whose_log_disk_is_full_still_sorts_and_says_so_once_per_log(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The logs folder on a disk that is full: the run sorts every image and exits 0, each of its two logs is
    said once to be unwritable; before, every line printed a 'Logging error' traceback and closing the log
    ended the command with a traceback and exit 1, files already sorted."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 6)
    with tmpfs(home.workdir / "logs", "64k") as logs:
        filler = fill(logs)
        run = fashion(home, inference_server.address, "run", "inbox", "--json")
        filler.unlink()
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["processed"] == 6
        said = [line for line in run.stderr.splitlines() if "cannot write the log file" in line]
        assert sorted(line.split("logs/")[1].split("_2")[0] for line in said) == ["batch", "batch_runner"], said
        assert "Traceback" not in run.stderr and "Logging error" not in run.stderr, run.stderr
        assert sorted(files_under(home.output)) == sorted(images)
        again = fashion(home, inference_server.address, "run", "inbox")  # space again: the next run's logs whole
        assert again.returncode == 0 and "cannot write" not in again.stderr, again.stderr
        runner_logs = sorted(logs.glob("batch_runner_*.log"))
        assert "✓ Batch completed successfully" in runner_logs[-1].read_text(encoding="utf-8")


def test_submit_wait_follows_the_job_across_a_restart_of_the_batch_service(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """`fashion batch submit --wait` while the Batch service is killed and started again on its address (a crash,
    a rolling update): the command says it lost the service, follows the resumed job once it is back and ends
    with the job's outcome (exit 0); it ended at once with UNAVAILABLE (exit 2) while the job went on."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 6)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = home.env(f"127.0.0.1:{free_port()}", FASHION_BATCH_HOST="127.0.0.1", FASHION_BATCH_PORT=str(port))
    batch = start_service("services.batch", home.workdir, env, address)  # no Inference there: the job waits
    batch.wait_serving(timeout=60)
    cli_env = {**os.environ, "COLUMNS": "200", **home.env(inference_server.address)}
    submit = subprocess.Popen([FASHION, "batch", "submit", "inbox", "--wait", "--address", address],
                              cwd=home.workdir, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not home.query("SELECT job_id FROM jobs WHERE state = 'waiting'"):
            assert time.monotonic() < deadline and submit.poll() is None, batch.output()
            time.sleep(0.1)
        batch.kill()
        time.sleep(1)  # the command meets a service that is down
        env["FASHION_INFERENCE_ADDRESS"] = inference_server.address
        batch = start_service("services.batch", home.workdir, env, address)
        out, err = submit.communicate(timeout=90)
    finally:
        batch.terminate()
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, out + err
    assert "SUCCEEDED" in out and "│ Processed    │ 6 " in out, out
    assert "Lost the Batch service" in out + err, out + err
    assert sorted(files_under(home.output)) == sorted(images)


def test_a_run_stops_when_the_inference_service_does_not_answer_for_its_max_wait(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """`fashion batch run` from cron with the Inference service down: it stopped never (a nightly run hung into
    the next one). After FASHION_BATCH_RUN_MAX_WAIT_S (--max-wait) it stops with one line naming the service and
    exit 2, every image in place; the same command, the service back, resumes the job and sorts them."""
    home = BatchHome(tmp_path)
    images = write_images(home.data / "inbox", 4)
    down = f"127.0.0.1:{free_port()}"
    stopped = fashion(home, down, "run", "inbox", "--max-wait", "2")
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert (f"error: the Inference service at {down} has not answered for 2 s (FASHION_BATCH_RUN_MAX_WAIT_S): "
            f"waiting for the Inference service at {down}: UNAVAILABLE") in stopped.stderr, stopped.stderr
    assert "resumes when the same command runs again" in stopped.stderr
    assert sorted(p.name for p in (home.data / "inbox").iterdir()) == sorted(images)
    runner_log = max((home.workdir / "logs").glob("batch_runner_*.log")).read_text(encoding="utf-8")
    assert "✗ Batch runner stopped: the Inference service at" in runner_log, runner_log
    again = fashion(home, inference_server.address, "run", "inbox", "--json")
    assert again.returncode == 0, again.stderr
    [resumed] = json.loads(again.stdout)["resumed_jobs"]
    assert (resumed["state"], resumed["processed"]) == ("succeeded", 4)
    assert sorted(files_under(home.output)) == sorted(images)

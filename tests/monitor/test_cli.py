"""`fashion monitor health|dashboard|alerts` as users run them: the installed command in a
subprocess, against real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.monitor.conftest import monitor_env, start_monitor, unused_address
from tests.monitor.test_service import SECTIONS, assert_valid_png
from tests.support import ServiceProcess

FASHION = str(Path(sys.executable).with_name("fashion"))


def fashion(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", "OTEL_SDK_DISABLED": "true", **env}
    return subprocess.run([FASHION, "monitor", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory, inference_server: ServiceProcess) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("monitor-cli")
    svc = start_monitor(workdir, monitor_env(workdir, inference_server.address, unused_address(),
                                             FASHION_MONITOR_CHECK_INTERVAL_S="1"))
    try:
        yield svc
    finally:
        svc.terminate()


def test_health_via_the_monitor_exits_1_and_says_what_is_unhealthy(monitor: ServiceProcess, tmp_path: Path) -> None:
    run = fashion("health", "--address", monitor.address, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    out = run.stdout
    assert "inference" in out and "✓ HEALTHY" in out and "model linear-test v7 loaded" in out
    assert "batch" in out and "✗ UNHEALTHY" in out and "unreachable" in out
    assert "BATCH PROCESSING HEALTH CHECK" in out and "Recent Execution: ✗ UNKNOWN" in out
    assert "✗ Down or unhealthy: batch" in out

    run = fashion("health", "--address", monitor.address, "--json", cwd=tmp_path)
    assert run.returncode == 1
    report = json.loads(run.stdout)
    assert report["healthy"] is False and report["status"] == "unhealthy" and report["down"] == ["batch"]
    assert [s["name"] for s in report["system"]["services"]] == ["inference", "batch"]
    assert report["system"]["services"][0]["status"] == "healthy"
    assert "Batch service" in report["batch"]["error"]


def test_health_without_a_monitor_checks_from_the_command_itself(
        inference_server: ServiceProcess, tmp_path: Path) -> None:
    down = unused_address()
    env = {"FASHION_INFERENCE_ADDRESS": inference_server.address, "FASHION_BATCH_ADDRESS": unused_address(),
           "FASHION_GATEWAY_ADDRESS": ""}
    run = fashion("health", "--address", down, cwd=tmp_path, **env)
    assert run.returncode == 1
    assert f"Monitor service at {down} unreachable" in run.stderr
    assert "monitor" in run.stdout and "model linear-test v7 loaded" in run.stdout

    run = fashion("health", "--embedded", "--json", cwd=tmp_path, **env)
    assert run.returncode == 1 and run.stderr == ""
    assert json.loads(run.stdout)["system"]["services"][0]["status"] == "healthy"


def test_dashboard_via_the_monitor_and_embedded(monitor: ServiceProcess, inference_server: ServiceProcess,
                                                tmp_path: Path) -> None:
    run = fashion("dashboard", "--address", monitor.address, "--days", "14", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for section in SECTIONS:
        assert section in run.stdout
    assert "by the Monitor service" in run.stdout

    out_dir = tmp_path / "my-reports"
    out_dir.mkdir()
    old, recent, other = ["report_20250101_090000.txt", "daily_volume_20250101_090000.png",
                          "dashboard_20250101_090000.html"], "report_20261101_090000.txt", "notes.txt"
    for name in [*old, recent, other]:
        (out_dir / name).write_text("earlier")
        age = 40 * 86400 if name in old or name == other else 5 * 86400
        os.utime(out_dir / name, (time.time() - age, time.time() - age))
    env = {"FASHION_INFERENCE_ADDRESS": inference_server.address, "FASHION_BATCH_ADDRESS": unused_address(),
           "FASHION_GATEWAY_ADDRESS": "", "FASHION_MONITOR_STATE_DB": str(tmp_path / "none.db"),
           "FASHION_RETENTION_DAYS": "30"}
    run = fashion("dashboard", "--output-dir", str(out_dir), "--json", cwd=tmp_path, **env)
    assert run.returncode == 0, run.stderr
    # Dashboard files older than FASHION_RETENTION_DAYS are gone; newer ones and other files stay.
    assert not [n for n in old if (out_dir / n).exists()]
    assert (out_dir / recent).exists() and (out_dir / other).exists()
    report = json.loads(run.stdout)
    assert Path(report["text_path"]).parent == out_dir
    text = Path(report["text_path"]).read_text()
    for section in SECTIONS:
        assert section in text
    assert "Not available: alert state is kept by the Monitor service" in text
    assert len(report["chart_paths"]) == 4
    for path in report["chart_paths"]:
        assert_valid_png(Path(path))
    assert Path(report["html_path"]).stat().st_size > sum(Path(p).stat().st_size for p in report["chart_paths"])


def test_alerts_lists_active_alerts_history_and_rules(monitor: ServiceProcess, tmp_path: Path) -> None:
    from tests.monitor.conftest import wait_until

    wait_until(lambda: "Batch Service Down" in fashion("alerts", "--address", monitor.address, cwd=tmp_path).stdout,
               20, "the batch alert in `fashion monitor alerts`")
    run = fashion("alerts", "--address", monitor.address, "--rules", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Active alerts" in run.stdout and "ERROR" in run.stdout and "History" in run.stdout
    assert "Rules" in run.stdout and "drift" in run.stdout and "under 95%" in run.stdout
    run = fashion("alerts", "--address", monitor.address, "--json", "--rule", "batch_service_down", cwd=tmp_path)
    listing = json.loads(run.stdout)
    assert [a["rule"] for a in listing["active"]] == ["batch_service_down"]
    assert listing["history"][0]["kind"] == "fired"


@pytest.mark.parametrize(("args", "message"), [
    (("dashboard", "--days", "0"), "days must be between 1 and 366, got 0"),
    (("health", "--days", "week"), "not a whole number of days: 'week'"),
    (("alerts", "--history", "-2"), "must be between 1 and 10000, got -2"),
])
def test_bad_arguments_exit_2_naming_the_problem(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    run = fashion(*args, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_alerts_with_an_unknown_rule_reports_the_servers_error(monitor: ServiceProcess, tmp_path: Path) -> None:
    run = fashion("alerts", "--address", monitor.address, "--rule", "nope", cwd=tmp_path)
    assert run.returncode == 2
    assert "error: INVALID_ARGUMENT: unknown rule 'nope'" in run.stderr


def test_alerts_needs_the_monitor(tmp_path: Path) -> None:
    address = unused_address()
    run = fashion("alerts", "--address", address, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("error: UNAVAILABLE: "), run.stderr
    assert f"(the Monitor service at {address}: is it running? `fashion run` starts every service; --address or " \
           "FASHION_MONITOR_ADDRESS says where it listens)" in run.stderr


def test_dashboard_into_a_folder_it_cannot_make_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    env = {"FASHION_INFERENCE_ADDRESS": unused_address(), "FASHION_BATCH_ADDRESS": unused_address(),
           "FASHION_GATEWAY_ADDRESS": "", "FASHION_MONITOR_STATE_DB": str(tmp_path / "none.db")}
    run = fashion("dashboard", "--text-only", "--output-dir", str(tmp_path / "a-file" / "reports"), cwd=tmp_path, **env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.splitlines() == [f"error: cannot write the report {tmp_path / 'a-file' / 'reports'}: "
                                       "Not a directory"], run.stderr



@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_report_files_get_the_mode_the_umask_leaves(tmp_path: Path, umask: int) -> None:
    """Under umask 077 no one else may read the reports (they name failed files and hosts); under 022 everyone
    may, as the charts beside them: every file of one report the same."""
    env = {"FASHION_INFERENCE_ADDRESS": unused_address(), "FASHION_BATCH_ADDRESS": unused_address(),
           "FASHION_GATEWAY_ADDRESS": "", "FASHION_MONITOR_STATE_DB": str(tmp_path / "none.db")}
    out = tmp_path / "reports"
    run = subprocess.run([FASHION, "monitor", "dashboard", "--output-dir", str(out), "--json"], cwd=tmp_path,
                         env={**os.environ, "OTEL_SDK_DISABLED": "true", **env}, capture_output=True, text=True,
                         timeout=120, umask=umask)
    assert run.returncode in (0, 1), run.stderr  # 1: the services are down (unhealthy), the report is written
    report = json.loads(run.stdout)
    files = [Path(report["text_path"]), Path(report["html_path"]), *map(Path, report["chart_paths"])]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}, files
    assert not list(out.glob(".report-*"))

def test_temporary_files_of_a_writer_killed_mid_report_are_swept_whatever_the_retention(tmp_path: Path) -> None:
    """A Monitor killed while writing a report leaves its hidden temporary files; with FASHION_RETENTION_DAYS=0
    (keep every report) they stayed for good. An hour old, they are a dead writer's and go with the next
    report; a fresh one may be another writer's, at work now, and stays."""
    out = tmp_path / "reports"
    out.mkdir()
    dead = [out / ".report-0123456789abcdef.tmp", out / "daily_volume_20261201_020000.png.tmp"]
    for path in dead:
        path.write_bytes(b"half a report")
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    at_work = out / ".report-fedcba9876543210.tmp"
    at_work.write_bytes(b"being written")
    env = {"FASHION_INFERENCE_ADDRESS": unused_address(), "FASHION_BATCH_ADDRESS": unused_address(),
           "FASHION_GATEWAY_ADDRESS": "", "FASHION_MONITOR_STATE_DB": str(tmp_path / "none.db"),
           "FASHION_RETENTION_DAYS": "0"}
    run = fashion("dashboard", "--text-only", "--output-dir", str(out), cwd=tmp_path, **env)
    assert run.returncode in (0, 1), run.stderr  # 1: the services are down (unhealthy), the report is written
    assert not any(path.exists() for path in dead) and at_work.exists()
    assert len(list(out.glob("report_*.txt"))) == 1


WRITE_REPORTS = """
import sys
import time
from datetime import datetime
from pathlib import Path
from services.monitor.dashboard import Dashboard, ReportData
from services.monitor.health import Health, ServiceCheck, SystemCheck
at = datetime(2026, 1, 2, 9, 0, 0)
def check(name):
    return ServiceCheck(name=name, address="x:1", status=Health.HEALTHY, serving_status="SERVING",
                        message=sys.argv[2], latency_ms=1.0, checked_at=at, reachable=True)
data = ReportData(at, SystemCheck(at, check("inference"), check("batch"), []), None, None)
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all writers start together
for _ in range(30):
    print(Dashboard(Path(sys.argv[1])).write(data, text_only=True).text_path, flush=True)
"""


def test_reports_of_the_same_second_from_several_processes_each_keep_a_name(tmp_path: Path) -> None:
    """The service and `fashion monitor dashboard --embedded` may write in the same second: every report keeps
    a name of its own (the guide's report_YYYYMMDD_HHMMSS, then _2, _3, ...) and its own text."""
    out_dir = tmp_path / "reports"
    out_dir.mkdir()
    start = str(time.time() + 8)
    writers = [subprocess.Popen([sys.executable, "-c", WRITE_REPORTS, str(out_dir), f"writer {n}", start],
                                stdout=subprocess.PIPE, text=True) for n in range(6)]
    written = [line for w in writers for line in w.communicate(timeout=120)[0].split()]
    assert all(w.returncode == 0 for w in writers) and len(written) == 180
    assert len(set(written)) == 180, "a report replaced another of the same second"
    texts = [Path(p).read_text() for p in written]
    assert sorted(sum(f"writer {n}" in t for t in texts) for n in range(6)) == [30] * 6
    assert not list(out_dir.glob(".*")), "no temporary file is left behind"

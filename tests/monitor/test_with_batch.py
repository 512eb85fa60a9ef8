"""The Monitor against a real Batch service process (and the shared Inference service): batch
health, the report's batch sections and `fashion monitor health` read from GetBatchStats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fashion.client import BatchClient, MonitorClient
from fashion.v1 import batch_pb2, health_pb2
from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.monitor.conftest import monitor_env, start_monitor, wait_until
from tests.monitor.test_cli import FASHION, fashion
from tests.monitor.test_service import SECTIONS, assert_valid_png
from tests.support import ServiceProcess, free_port, start_service

pytestmark = pytest.mark.timeout(180)


@dataclass
class Stack:
    batch: ServiceProcess
    monitor: ServiceProcess
    data: Path
    first_job: batch_pb2.Job


def run_job(batch: ServiceProcess, data: Path, files: dict[str, bytes]) -> batch_pb2.Job:
    inbox = data / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (inbox / name).write_bytes(content)
    with BatchClient(batch.address) as client:
        job = client.submit("inbox")
        job = client.wait(job.job_id, timeout_s=90)
    assert job.state == batch_pb2.JOB_STATE_SUCCEEDED, job
    return job


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, inference_server: ServiceProcess) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("with-batch")
    data = workdir / "data"
    port = free_port()
    batch = start_service("services.batch", workdir / "batch", {
        "FASHION_BATCH_HOST": "127.0.0.1", "FASHION_BATCH_PORT": str(port), "FASHION_BATCH_METRICS_PORT": "0",
        "FASHION_DATA_ROOT": str(data), "FASHION_RESULTS_DIR": str(workdir / "results"),
        "FASHION_INFERENCE_ADDRESS": inference_server.address, "FASHION_BATCH_SCHEDULE": "",
        "FASHION_GATEWAY_ADDRESS": "",
        "FASHION_LOG_DIR": str(workdir / "batch-logs"), "FASHION_BATCH_MIN_CONFIDENCE": "0",
        "FASHION_BATCH_FSYNC": "false", "OTEL_SDK_DISABLED": "true",
        "PYTHONFAULTHANDLER": "1",  # a crash of the service shows its stack in the output
    }, f"127.0.0.1:{port}")
    monitor = None
    try:
        batch.wait_serving()
        x, _ = fashion_images(30)
        job = run_job(batch, data, {f"product_{i:03}.png": encode(img) for i, img in enumerate(x)})
        monitor = start_monitor(workdir / "monitor", monitor_env(
            workdir / "monitor", inference_server.address, batch.address, FASHION_MONITOR_CHECK_INTERVAL_S="1",
            FASHION_ALERT_DISK_FREE_MIN_PERCENT="0"))  # this machine's free space must not decide the test
        yield Stack(batch, monitor, data, job)
    finally:
        if monitor is not None:
            monitor.terminate()
        batch.terminate()


def test_everything_healthy_after_a_clean_run(stack: Stack, tmp_path: Path) -> None:
    with MonitorClient(stack.monitor.address) as client:
        system = client.system_health()
        batch = client.batch_health()
    assert [(s.name, s.status) for s in system.services] == [
        ("inference", health_pb2.HEALTH_STATUS_HEALTHY), ("batch", health_pb2.HEALTH_STATUS_HEALTHY)]
    assert system.status == health_pb2.HEALTH_STATUS_HEALTHY
    # The data root's free space, measured by the Batch service: the disk alert covers it from afar.
    remote = [d for d in system.disks if d.path == f"{stack.data} (on the Batch service)"]
    assert len(remote) == 1 and remote[0].total_bytes == shutil.disk_usage(stack.data).total
    assert 0 < remote[0].free_percent <= 100 and remote[0].folder_bytes == 0
    assert system.services[1].batch_stats.runs == 1 and "last run 0.0 hours ago" in system.services[1].message
    assert batch.status == health_pb2.HEALTH_STATUS_HEALTHY and batch.recent_run
    assert batch.message == "Last run was 0.0 hours ago" and batch.max_age_hours == 26
    assert batch.stats.runs == 1 and batch.stats.images == 30 and batch.stats.successful == 30
    assert {c.category: c.count for c in batch.stats.top_categories} == dict(stack.first_job.categories)

    run = fashion("health", "--address", stack.monitor.address, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    for line in ["Recent Execution: ✓ HEALTHY", "  Last run was 0.0 hours ago", "Recent Errors: ✓ No errors detected",
                 "Last 7 Days Statistics:", "  Total runs: 1", "  Images processed: 30", "  Successful: 30",
                 "  Failed: 0", "  Success rate: 100.0%", "All systems healthy"]:
        assert line in run.stdout, line


def test_report_shows_the_batch_statistics(stack: Stack) -> None:
    with MonitorClient(stack.monitor.address) as client:
        report = client.generate_report()
    text = report.text
    for section in SECTIONS:
        assert section in text
    top = max(stack.first_job.categories.items(), key=lambda kv: kv[1])
    for line in ["  ✓ Status: HEALTHY\n     Message: Last run 0.0 hours ago", "  Total Runs: 1",
                 "  Images Processed: 30", "  Success Rate: 100.0%", "  Failed: 0", "  Top Categories:",
                 f"    - {top[0]}: {top[1]}", "  ✓ No recent errors detected"]:
        assert line in text, line
    assert report.status == health_pb2.HEALTH_STATUS_HEALTHY
    for path in report.chart_paths:
        assert_valid_png(Path(path))


def test_batch_errors_show_in_health_report_and_cli(stack: Stack, tmp_path: Path) -> None:
    x, _ = fashion_images(5, start=30)
    files = {f"more_{i}.png": encode(img) for i, img in enumerate(x)}
    hostile = "broken\n\nACTIVE ALERTS:\n  ✓ No active alerts\n_scan.png"  # a name that writes a report section
    files[hostile] = b"this is not an image"
    job = run_job(stack.batch, stack.data, files)
    assert job.failed == 1
    with MonitorClient(stack.monitor.address) as client:
        batch = client.batch_health(days=3)
        report = client.generate_report(text_only=True)
    assert batch.status == health_pb2.HEALTH_STATUS_DEGRADED and batch.recent_run
    assert batch.stats.days == 3 and batch.stats.runs == 2 and batch.stats.failed == 1
    shown = "broken\\n\\nACTIVE ALERTS:\\n  ✓ No active alerts\\n_scan.png"  # one line, escaped
    assert any(shown in e for e in batch.recent_errors) and not any("\n" in e for e in batch.recent_errors)
    assert "RECENT ERRORS:\n  ✗ 1 recent errors (newest first):\n    - " in report.text
    assert shown in report.text and "  Total Runs: 2" in report.text
    assert report.text.count("ACTIVE ALERTS:\n") == 1, report.text

    # One corrupt image is a warning, not an outage (the guide's health_check.sh): exit 0; --strict: 1.
    run = fashion("health", "--address", stack.monitor.address, "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stdout
    out = json.loads(run.stdout)
    assert out["healthy"] is False and out["status"] == "degraded" and out["down"] == []
    assert out["batch"]["status"] == "degraded"
    assert out["warnings"] == ["batch processing DEGRADED: 1 recent errors"]
    run = fashion("health", "--address", stack.monitor.address, cwd=tmp_path)
    assert run.returncode == 0
    assert "Recent Errors: ⚠ 1 errors in the last 24 hours" in run.stdout and shown in run.stdout
    assert "⚠ batch processing DEGRADED: 1 recent errors" in run.stdout
    assert "⚠ Serving, with 1 warning(s)" in run.stdout
    strict = fashion("health", "--address", stack.monitor.address, "--strict", cwd=tmp_path)
    assert strict.returncode == 1 and "(--strict: exit 1)" in strict.stdout


def test_the_gateway_is_watched_and_its_death_is_the_api_down(stack: Stack, inference_server: ServiceProcess,
                                                              tmp_path: Path) -> None:
    """For the monitoring guide's users the API is the HTTP API: a gateway that stops answering /health
    makes `fashion monitor health` exit 1 naming it, and fires API Down."""
    gateway = start_gateway(tmp_path / "gateway", inference_server.address)
    gateway.wait_ready()
    address = gateway.url.removeprefix("http://")
    monitor = start_monitor(tmp_path / "monitor", monitor_env(
        tmp_path / "monitor", inference_server.address, stack.batch.address, FASHION_GATEWAY_ADDRESS=address,
        FASHION_ALERT_DISK_FREE_MIN_PERCENT="0"))
    try:
        run = fashion("health", "--address", monitor.address, "--json", cwd=tmp_path)
        out = json.loads(run.stdout)
        services = {s["name"]: s for s in out["system"]["services"]}
        assert run.returncode == 0 and services["gateway"]["serving_status"] == "HTTP 200 healthy", run.stdout
        assert services["gateway"]["address"] == address

        with MonitorClient(monitor.address) as client:
            report = client.generate_report(text_only=True).text
        assert f"REST gateway ({address}): HEALTHY" in report

        gateway.proc.kill()
        gateway.proc.wait()
        run = fashion("health", "--address", monitor.address, cwd=tmp_path)
        assert run.returncode == 1, run.stdout
        assert "✗ Down or unhealthy: gateway" in run.stdout and "REST gateway at" in run.stdout
        with MonitorClient(monitor.address) as client:
            wait_until(lambda: any(a.rule == "api_down" for a in client.alerts().active), 20, "api_down fires")
            fired = next(a for a in client.alerts().active if a.rule == "api_down")
        assert "REST gateway at" in fired.message and "unreachable" in fired.message
    finally:
        monitor.terminate()
        if gateway.proc.poll() is None:
            gateway.terminate()


def same_shape(one: object, other: object) -> bool:
    """Whether two JSON values have the same field names and value types, recursively (lists by their
    first elements, when both have one)."""
    if isinstance(one, dict) and isinstance(other, dict):
        return one.keys() == other.keys() and all(same_shape(one[key], other[key]) for key in one)
    if isinstance(one, list) and isinstance(other, list):
        return not one or not other or same_shape(one[0], other[0])
    return type(one) is type(other)


def test_the_commands_print_the_same_json_as_the_gateway(stack: Stack, inference_server: ServiceProcess,
                                                         tmp_path: Path) -> None:
    """A script reads the same fields whether it runs `fashion ... --json` or calls the REST gateway:
    numbers as numbers (not protobuf's strings for 64-bit integers), short enum names, snake_case."""
    gateway = start_gateway(tmp_path / "gateway", inference_server.address, FASHION_BATCH_ADDRESS=stack.batch.address,
                            FASHION_MONITOR_ADDRESS=stack.monitor.address)
    try:
        gateway.wait_ready()
        job_id = stack.first_job.job_id

        def command(*args: str) -> object:  # `fashion stats` and `fashion model info` print JSON without --json
            flag = [] if args[0] in ("stats", "model") else ["--json"]
            run = subprocess.run([FASHION, *args, *flag], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "OTEL_SDK_DISABLED": "true"})
            assert run.returncode == 0, run.stderr
            return json.loads(run.stdout)

        job = command("batch", "status", job_id, "--address", stack.batch.address)
        assert job == httpx.get(f"{gateway.url}/batch/jobs/{job_id}", timeout=10).json()
        assert job["processed"] == 30 and job["state"] == "succeeded" and job["trigger"] == "api"
        listed = command("batch", "list", "--address", stack.batch.address)
        assert listed == httpx.get(f"{gateway.url}/batch/jobs", timeout=10).json()["jobs"]
        assert command("model", "info", "--address", inference_server.address) == httpx.get(
            f"{gateway.url}/model", timeout=10).json()
        # Alerts are evaluated every second here (their messages quote live rates): the same shape.
        alerts = command("monitor", "alerts", "--address", stack.monitor.address)
        assert same_shape(alerts, httpx.get(f"{gateway.url}/monitor/alerts", timeout=10).json())
        assert [rule["severity"] for rule in alerts["rules"]][:2] == ["critical", "warning"], alerts["rules"]

        stats = command("stats", "--address", inference_server.address)
        served = httpx.get(f"{gateway.url}/stats", timeout=10).json()
        for field in ("total_requests", "total_images_processed", "successful_predictions", "failed_predictions"):
            assert type(stats[field]) is int and stats[field] == served[field], field
    finally:
        gateway.terminate()

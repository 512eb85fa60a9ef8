"""fashion.v1.MonitorService through real gRPC channels: system health, batch health, reports,
alerts, bad input. One Monitor process (checking the shared Inference service) serves the module."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from fashion.client import AsyncMonitorClient, MonitorClient
from fashion.v1 import health_pb2
from fashion.v1 import monitor_pb2 as pb
from tests.monitor.conftest import monitor_env, start_monitor, unused_address, wait_until
from tests.support import ServiceProcess, health_status

SECTIONS = ["FASHION CLASSIFIER - MONITORING REPORT", "API HEALTH:", "BATCH PROCESSING HEALTH:",
            "BATCH STATISTICS (Last 7 Days):", "DISK USAGE:", "RECENT ERRORS:", "ACTIVE ALERTS:"]


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory, inference_server: ServiceProcess) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("monitor")
    svc = start_monitor(workdir, monitor_env(workdir, inference_server.address, unused_address(),
                                             FASHION_MONITOR_CHECK_INTERVAL_S="1"))
    try:
        yield svc
    finally:
        svc.terminate()


def assert_valid_png(path: Path, min_size: tuple[int, int] = (800, 400)) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        # Not a blank canvas: a chart has many colours.
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 20


def test_system_health_reports_each_service_with_check_latency(monitor: ServiceProcess,
                                                              inference_server: ServiceProcess) -> None:
    with MonitorClient(monitor.address) as client:
        health = client.system_health()
    inference, batch = health.services
    assert inference.name == "inference" and inference.address == inference_server.address
    assert inference.status == health_pb2.HEALTH_STATUS_HEALTHY and inference.serving_status == "SERVING"
    assert inference.latency_ms > 0
    assert inference.inference_stats.model_loaded and inference.inference_stats.model_name == "linear-test"
    assert "model linear-test v7 loaded" in inference.message
    assert batch.name == "batch" and batch.status == health_pb2.HEALTH_STATUS_UNHEALTHY
    assert batch.serving_status == "UNAVAILABLE" and "unreachable" in batch.message
    assert health.status == health_pb2.HEALTH_STATUS_UNHEALTHY
    assert health.disks and 0 < health.disks[0].free_percent <= 100 and health.disks[0].total_bytes > 0
    assert health.checked_at.seconds > 0


async def test_async_client_and_batch_health_when_the_batch_service_is_down(monitor: ServiceProcess) -> None:
    async with AsyncMonitorClient(monitor.address) as client:
        assert (await client.system_health()).services[0].status == health_pb2.HEALTH_STATUS_HEALTHY
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.batch_health(timeout_s=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Batch service" in err.value.details() and "GetBatchHealth" in err.value.details()


@pytest.mark.parametrize(("call", "needle"), [
    (lambda c: c.batch_health(days=-3), "days must be between 1 and 366, got -3"),
    (lambda c: c.generate_report(chart_days=400), "chart_days must be between 1 and 366, got 400"),
    (lambda c: c.alerts(history_limit=-1), "history_limit must be between 0 and 10000, got -1"),
    (lambda c: c.alerts(rule="no_such_rule"), "unknown rule 'no_such_rule'; rules are api_down"),
])
def test_bad_arguments_are_invalid_argument_and_the_service_keeps_serving(monitor: ServiceProcess, call,
                                                                          needle: str) -> None:
    with MonitorClient(monitor.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            call(client)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
        assert client.system_health().services[0].status == health_pb2.HEALTH_STATUS_HEALTHY
    assert health_status(monitor.address, "fashion.v1.MonitorService") == "SERVING"


def test_generate_report_writes_the_dashboard(monitor: ServiceProcess) -> None:
    with MonitorClient(monitor.address) as client:
        report = client.generate_report(chart_days=10)
    text = Path(report.text_path).read_text()
    assert text == report.text
    for section in SECTIONS:
        assert section in text, section
    assert re.search(r"Generated: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)
    assert "✓ Status: HEALTHY" in text and "model linear-test v7 loaded" in text
    assert "Not available: the Batch service did not answer" in text
    assert Path(report.text_path).name.startswith("report_") and Path(report.text_path).parent.name == "reports"
    assert [Path(p).name.split("_2")[0] for p in report.chart_paths] == [
        "daily_volume", "success_failure", "category_distribution", "summary_statistics"]
    for path in report.chart_paths:
        assert_valid_png(Path(path))
    page = Path(report.html_path).read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 4
    assert base64.b64decode(embedded[0]) == Path(report.chart_paths[0]).read_bytes()
    assert "<pre>" in page and "API HEALTH:" in page and "http" not in page.split("<body>")[1].replace(
        "http-equiv", "")  # self-contained: nothing fetched from elsewhere
    assert report.status == health_pb2.HEALTH_STATUS_UNHEALTHY  # the Batch service is down

    with MonitorClient(monitor.address) as client:
        text_only = client.generate_report(text_only=True)
    assert text_only.chart_paths == [] and text_only.html_path == ""
    assert text_only.text_path != report.text_path and Path(text_only.text_path).exists()


def test_list_alerts_shows_rules_and_the_batch_alert(monitor: ServiceProcess) -> None:
    with MonitorClient(monitor.address) as client:
        listing = client.alerts()
    assert [r.rule for r in listing.rules] == [
        "api_down", "high_error_rate", "no_recent_batch_run", "disk_space_low", "high_response_time",
        "model_load_failure", "batch_service_down", "drift"]
    by_rule = {r.rule: r for r in listing.rules}
    assert by_rule["high_error_rate"].condition == "API or batch success rate under 95%"
    assert by_rule["api_down"].severity == pb.SEVERITY_CRITICAL
    with MonitorClient(monitor.address) as client:
        wait_until(lambda: "batch_service_down" in [a.rule for a in client.alerts().active], 10,
                   "the Batch Service Down alert", monitor.output)
        active = client.alerts().active
    assert "api_down" not in [a.rule for a in active]
    down = next(a for a in active if a.rule == "batch_service_down")
    assert down.severity == pb.SEVERITY_ERROR and down.state == pb.ALERT_STATE_FIRING and down.started_at.seconds


@pytest.mark.parametrize(("env", "message"), [
    ({"FASHION_ALERT_DISABLED_RULES": "api_down,api_dwon"}, "unknown alert rule(s) ['api_dwon']"),
    ({"FASHION_SMTP_HOST": "mail.example"}, "FASHION_SMTP_TO has no recipient"),
    ({"FASHION_SMTP_HOST": "mail.example", "FASHION_SMTP_TO": "ops@example.com", "FASHION_SMTP_PASSWORD": "pw"},
     "FASHION_SMTP_PASSWORD (or FASHION_SMTP_PASSWORD_FILE) is set but FASHION_SMTP_USER is not"),
    ({"FASHION_REPORT_CRON": "daily"}, "not a cron expression: 'daily'"),
])
def test_a_wrong_setting_stops_the_start_with_the_reason(tmp_path: Path, env: dict[str, str], message: str) -> None:
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "services.monitor"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, **monitor_env(tmp_path, unused_address(), unused_address()), **env},
                         timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr

"""The alert rules' state against real services: the API window over several Inference servers behind
one round_robin address (as a headless Service spreads the Monitor's calls over the pods), alerts of
rules disabled or given another severity across a restart of the Monitor service, and a state file
that cannot be written (its disk full) while an alert fires."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fashion.client import InferenceClient, MonitorClient
from fashion.v1 import monitor_pb2 as pb
from services.common.config import MonitorSettings
from services.monitor.alerting import AlertEngine
from services.monitor.health import SystemChecker
from services.monitor.rules import ApiStatsWindow, ApiWindow, Observation, build_rules
from services.monitor.store import MonitorStore
from tests.batch.conftest import fill, tmpfs
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.monitor.conftest import SmtpInbox, monitor_env, start_monitor, unused_address, wait_until
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(240)

RULES = ("api_down", "high_error_rate", "no_recent_batch_run", "disk_space_low", "high_response_time",
         "model_load_failure", "batch_service_down", "drift")


def all_rules_but(*kept: str) -> str:
    """FASHION_ALERT_DISABLED_RULES leaving only `kept` evaluated."""
    return ",".join(r for r in RULES if r not in kept)


# --- the API window over several Inference servers -----------------------------------------------

GOOD_PER_ROUND = {0: 20, 1: 19, 2: 18}
"""Per server, of 20 images sent each round, how many are valid: 100%, 95% and 90% success."""
ROUND_IMAGES = 20


def send_images(address: str, good: int, bad: int, images: list[bytes]) -> None:
    """One ClassifyBatch to the server at `address`: `good` valid images and `bad` that are not images."""
    batch = [images[i % len(images)] for i in range(good)] + [b"this is not an image"] * bad
    with InferenceClient(address) as client:
        response = client.classify_batch(batch)
    assert sum(not r.HasField("error") for r in response.results) == good


def test_api_window_over_round_robin_servers_compares_each_server_only_with_itself(
        tmp_path: Path, linear_model, monkeypatch: pytest.MonkeyPatch) -> None:
    images = [encode(x) for x in fashion_images(8)[0]]
    servers: list[ServiceProcess] = []
    try:
        for i in range(3):
            servers.append(start_inference(tmp_path / f"inference-{i}", linear_model[0]))
        for server in servers:
            server.wait_serving()
        # Lifetimes as different as long-running pods': one busy and healthy, one with some errors, one idle.
        send_images(servers[0].address, 300, 0, images)
        send_images(servers[1].address, 57, 3, images)
        window_s = 3.0
        for server in servers:  # older than the window: the window is judged from differences
            with InferenceClient(server.address) as client:
                wait_until(lambda c=client: c.stats().uptime_seconds > window_s, 30, "uptime over the window")

        # The Monitor's settings as the Kubernetes configuration gives them: every pod's address, round_robin.
        ports = [s.address.rsplit(":", 1)[1] for s in servers]
        monkeypatch.setenv("FASHION_INFERENCE_ADDRESS", "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports))
        monkeypatch.setenv("FASHION_GRPC_LB_POLICY", "round_robin")
        monkeypatch.setenv("FASHION_BATCH_ADDRESS", unused_address())
        monkeypatch.setenv("FASHION_GATEWAY_ADDRESS", "")
        monkeypatch.setenv("FASHION_REPORT_FOLDERS", str(tmp_path))
        monkeypatch.setenv("FASHION_ALERT_DISABLED_RULES", all_rules_but("high_error_rate", "high_response_time"))
        monkeypatch.setenv("FASHION_ALERT_SUCCESS_RATE_MIN", "85")
        monkeypatch.setenv("FASHION_ALERT_MIN_IMAGES", str(ROUND_IMAGES))
        monkeypatch.setenv("FASHION_ALERT_CONFIRM_CHECKS", "1")
        monkeypatch.setenv("FASHION_ALERT_API_WINDOW_S", str(window_s))
        settings = MonitorSettings()
        store = MonitorStore(tmp_path / "monitor.db")
        engine = AlertEngine(build_rules(settings), store, ["email"], 0, 1)
        window = ApiStatsWindow(settings.alert_api_window_s)
        judged: list[ApiWindow] = []
        instances: set[str] = set()

        async def rounds(count: int) -> None:
            """Traffic to every server, then one evaluation cycle as the Monitor runs it, `count` times."""
            checker = SystemChecker(settings)
            try:
                for _ in range(count):
                    for i, server in enumerate(servers):
                        send_images(server.address, GOOD_PER_ROUND[i], ROUND_IMAGES - GOOD_PER_ROUND[i], images)
                    system = await checker.check()
                    stats = system.inference.inference_stats
                    assert stats is not None, system.inference.message
                    instances.add(stats.instance_id)
                    now = time.time()
                    api = window.add(now, stats)
                    if api is not None and api.images >= ROUND_IMAGES:
                        # Each server's own rate is 100, 95 or 90%: any mixture of them lies in between.
                        assert 90.0 <= api.success_rate <= 100.0, (api, stats)
                        assert 0.0 <= api.latency_s < 5.0, api
                        judged.append(api)
                    engine.evaluate(Observation(system, api, now, now))
                    await asyncio.sleep(0.15)
            finally:
                await checker.close()

        asyncio.run(rounds(24))
        assert len(instances) == 3 and "" not in instances, instances  # every server answered, each its own id

        # One server restarts on its port: a new instance, whose counters start over.
        port = servers[2].address.rsplit(":", 1)[1]
        servers[2].terminate()
        servers[2] = start_inference(tmp_path / "inference-2b", linear_model[0], FASHION_INFERENCE_PORT=port)
        servers[2].wait_serving()
        asyncio.run(rounds(24))
        assert len(instances) == 4, instances

        assert len(judged) >= 20, f"too few windows with traffic to judge: {judged}"
        assert any(w.images >= 3 * ROUND_IMAGES for w in judged), judged  # windows over several servers
        assert engine.active() == [] and store.outbox_size() == 0, [a.message for a in engine.active()]
        assert store.history(10) == []
    finally:
        for server in servers:
            server.kill()


def test_server_processes_sharing_a_port_answer_with_the_servers_instance_id(tmp_path: Path, linear_model) -> None:
    """FASHION_INFERENCE_PROCESSES=2: whichever process answers GetStats, its counters are the server's
    sum, and so is its instance_id (the supervising process's), not the answering process's."""
    svc = start_inference(tmp_path / "run", linear_model[0], FASHION_INFERENCE_PROCESSES="2",
                          FASHION_WORKER_PROCESSES="0")
    try:
        svc.wait_serving()
        ids = set()
        for _ in range(20):  # new connections: the kernel spreads them over both processes
            with InferenceClient(svc.address) as client:
                ids.add(client.stats().instance_id)
        assert len(ids) == 1, ids
        host, pid, started = ids.pop().rsplit(":", 2)
        assert host == socket.gethostname() and pid == str(svc.proc.pid) and float(started) <= time.time()
    finally:
        svc.terminate()


# --- alerts of rules disabled or given another severity --------------------------------------------

QUIET = all_rules_but("api_down", "model_load_failure")
API_DOWN = "[CRITICAL] API Down"


def firing_series(metrics_port: str, rule: str) -> dict[str, float]:
    """fashion_monitor_alert_firing of `rule` on the Monitor's /metrics: severity -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.labels["severity"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "fashion_monitor_alert_firing" for s in family.samples if s.labels["rule"] == rule}


def test_disabling_a_firing_rule_resolves_its_alert_without_a_notification(
        tmp_path: Path, smtp_inbox: SmtpInbox) -> None:
    env = monitor_env(tmp_path, unused_address(), unused_address(), FASHION_SMTP_HOST="127.0.0.1",
                      FASHION_SMTP_PORT=str(smtp_inbox.port), FASHION_SMTP_TO="ops@fashion.example",
                      FASHION_ALERT_DISABLED_RULES=QUIET, FASHION_MONITOR_METRICS_PORT=str(free_port()))
    metrics_port = env["FASHION_MONITOR_METRICS_PORT"]
    monitor = start_monitor(tmp_path, env)
    try:
        wait_until(lambda: smtp_inbox.subjects() == [API_DOWN], 20, "the API Down email", monitor.output)
        assert monitor.terminate() == 0

        # The operator disables the rule while its alert fires and restarts the Monitor: the alert ends.
        monitor = start_monitor(tmp_path, {**env, "FASHION_ALERT_DISABLED_RULES": QUIET + ",api_down"})
        with MonitorClient(monitor.address) as client:
            listing = client.alerts(rule="api_down")
            assert list(listing.active) == []
            assert [(e.kind, e.notified) for e in listing.history] == [("resolved", False), ("fired", True)]
            assert "rule disabled" in listing.history[0].message
            assert firing_series(metrics_port, "api_down").get("CRITICAL", 0.0) == 0.0
            time.sleep(1.0)  # a few evaluation cycles: nothing is sent about a rule the operator turned off
            assert smtp_inbox.subjects() == [API_DOWN] and client.alerts().pending_notifications == 0
            assert list(client.alerts().active) == []
        assert monitor.terminate() == 0

        # Enabled again with the API still down: a new incident, notified as such.
        monitor = start_monitor(tmp_path, env)
        wait_until(lambda: smtp_inbox.subjects() == [API_DOWN, API_DOWN], 20, "the new incident's email",
                   monitor.output)
        assert firing_series(metrics_port, "api_down") == {"CRITICAL": 1.0}
    finally:
        monitor.kill()


def test_a_severity_change_moves_the_firing_series_to_the_new_severity(
        tmp_path: Path, linear_model, smtp_inbox: SmtpInbox) -> None:
    inference_port = str(free_port())
    env = monitor_env(tmp_path / "monitor", f"127.0.0.1:{inference_port}", unused_address(),
                      FASHION_SMTP_HOST="127.0.0.1", FASHION_SMTP_PORT=str(smtp_inbox.port),
                      FASHION_SMTP_TO="ops@fashion.example", FASHION_ALERT_DISABLED_RULES=QUIET,
                      FASHION_MONITOR_METRICS_PORT=str(free_port()))
    metrics_port = env["FASHION_MONITOR_METRICS_PORT"]
    monitor = start_monitor(tmp_path / "monitor", env)
    inference = None
    try:
        wait_until(lambda: smtp_inbox.subjects() == [API_DOWN], 20, "the API Down email", monitor.output)
        assert firing_series(metrics_port, "api_down") == {"CRITICAL": 1.0}
        assert monitor.terminate() == 0

        monitor = start_monitor(tmp_path / "monitor", {**env, "FASHION_ALERT_SEVERITY": "api_down=WARNING"})
        with MonitorClient(monitor.address) as client:
            assert [(a.rule, a.severity) for a in client.alerts().active] == [("api_down", pb.SEVERITY_WARNING)]
        time.sleep(1.0)  # a few evaluation cycles with the alert still firing
        assert firing_series(metrics_port, "api_down") == {"WARNING": 1.0}

        inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_INFERENCE_PORT=inference_port)
        inference.wait_serving()
        wait_until(lambda: len(smtp_inbox.subjects()) == 2, 30, "the resolution email", monitor.output)
        assert smtp_inbox.subjects() == [API_DOWN, "[INFO] Resolved: API Down"]
        assert firing_series(metrics_port, "api_down") == {"WARNING": 0.0}  # no CRITICAL series left at 1
    finally:
        monitor.kill()
        if inference is not None:
            inference.kill()


# --- a state file that cannot be written -----------------------------------------------------------

DISK_LOW = "[WARNING] Disk Space Low"


def test_an_alert_whose_state_cannot_be_saved_is_notified_once_the_disk_has_room(
        tmp_path: Path, smtp_inbox: SmtpInbox) -> None:
    """The state file's disk fills up: the Disk Space Low alert cannot be recorded then; it is sent
    once some room is freed (the disk still low on space), exactly once."""
    with tmpfs(tmp_path / "disk", size="4m") as disk:
        env = monitor_env(tmp_path, unused_address(), unused_address(), FASHION_SMTP_HOST="127.0.0.1",
                          FASHION_SMTP_PORT=str(smtp_inbox.port), FASHION_SMTP_TO="ops@fashion.example",
                          FASHION_ALERT_DISABLED_RULES=all_rules_but("disk_space_low"),
                          FASHION_ALERT_DISK_FREE_MIN_PERCENT="50", FASHION_REPORT_FOLDERS=str(disk),
                          FASHION_MONITOR_STATE_DB=str(disk / "monitor.db"))
        monitor = start_monitor(tmp_path, env)
        try:
            time.sleep(1.0)  # a few evaluation cycles with room on the disk: nothing to say
            assert smtp_inbox.subjects() == []
            filler = fill(disk)
            wait_until(lambda: "could not be saved" in monitor.output() or "evaluation failed" in monitor.output(),
                       20, "a failed write of the alert state", monitor.output)
            time.sleep(1.0)  # more cycles on the full disk
            out = monitor.output()
            assert "Alert rule disk_space_low: its new state could not be saved" in out, out
            assert "database or disk is full" in out
            assert smtp_inbox.subjects() == []

            # Some room again (the disk still under the threshold): the alert is recorded and sent.
            os.truncate(filler, max(0, filler.stat().st_size - 512 * 1024))
            wait_until(lambda: smtp_inbox.subjects(), 20, "the Disk Space Low email", monitor.output)
            time.sleep(1.5)
            assert smtp_inbox.subjects() == [DISK_LOW], "sent exactly once"
            with MonitorClient(monitor.address) as client:
                listing = client.alerts(rule="disk_space_low")
                assert [(a.rule, a.notified) for a in listing.active] == [("disk_space_low", True)]
                assert [(e.kind, e.notified) for e in listing.history] == [("fired", True)]
                assert listing.pending_notifications == 0
            assert monitor.terminate() == 0
        finally:
            monitor.kill()

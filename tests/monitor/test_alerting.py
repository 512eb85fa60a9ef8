"""Alerting end to end: the Monitor service process watches a real Inference service and sends
email to a real SMTP server and Slack JSON to a real HTTP server, all on loopback."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fashion.client import MonitorClient
from fashion.v1 import health_pb2
from fashion.v1 import monitor_pb2 as pb
from tests.conftest import start_inference
from tests.monitor.conftest import (
    SmtpInbox,
    WebhookReceiver,
    monitor_env,
    start_monitor,
    unused_address,
    wait_until,
)
from tests.monitor.test_cli import fashion
from tests.support import free_port, health_status

pytestmark = pytest.mark.timeout(180)

API_DOWN = "[CRITICAL] API Down"
API_RESOLVED = "[INFO] Resolved: API Down"
# Only the rules this test is about: the other rules would fire on this machine's state (no Batch
# service, the disk) and are tested on their own.
QUIET = "batch_service_down,disk_space_low,no_recent_batch_run,drift,high_error_rate,high_response_time"


def api_mail(inbox: SmtpInbox) -> list[str]:
    return [s for s in inbox.subjects() if "API Down" in s]


def test_api_down_fires_once_survives_a_monitor_restart_and_resolves(
        tmp_path: Path, linear_model, smtp_inbox: SmtpInbox, webhook: WebhookReceiver) -> None:
    inference = start_inference(tmp_path / "inference", linear_model[0])
    env = monitor_env(tmp_path / "monitor", inference.address, unused_address(),
                      FASHION_SMTP_HOST="127.0.0.1", FASHION_SMTP_PORT=str(smtp_inbox.port),
                      FASHION_SMTP_TO="ops@fashion.example", FASHION_SLACK_WEBHOOK_URL=webhook.url,
                      FASHION_ALERT_DISABLED_RULES=QUIET)
    monitor = None
    try:
        inference.wait_serving()
        monitor = start_monitor(tmp_path / "monitor", env)
        with MonitorClient(monitor.address) as client:
            wait_until(lambda: client.system_health().services[0].status == health_pb2.HEALTH_STATUS_HEALTHY, 20,
                       "the Monitor to see the Inference service healthy", monitor.output)
        time.sleep(1.0)  # a few evaluation cycles while all is well: nothing is sent
        assert smtp_inbox.subjects() == [] and webhook.posts == []

        inference.terminate()
        wait_until(lambda: api_mail(smtp_inbox) and webhook.posts, 20, "the API Down email and Slack message",
                   monitor.output)
        time.sleep(1.5)  # ~5 more evaluation cycles with the API still down
        assert api_mail(smtp_inbox) == [API_DOWN], "fired exactly once per incident"
        mail = smtp_inbox.messages[0]
        assert mail["To"] == "ops@fashion.example"
        assert f"Inference service at {inference.address} unreachable" in mail.get_content()
        since = time.strftime("%Z", time.localtime(time.time()))
        assert re.search(rf"Since: \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {since}\s", mail.get_content()), \
            mail.get_content()  # with its time zone: the reader may be in another
        assert len(webhook.posts) == 1
        post = webhook.posts[0]
        assert post["username"] == "Fashion Classifier Bot" and post["icon_emoji"] == ":robot_face:"
        assert str(post["text"]).startswith(":rotating_light: *[CRITICAL] API Down*")

        # The Monitor restarts while the API is still down: the incident is remembered, not re-sent.
        assert monitor.terminate() == 0
        monitor = start_monitor(tmp_path / "monitor", env)
        with MonitorClient(monitor.address) as client:
            active = client.alerts().active
            assert [(a.rule, a.state, a.notified) for a in active] == [("api_down", pb.ALERT_STATE_FIRING, True)]
            time.sleep(1.5)
            assert api_mail(smtp_inbox) == [API_DOWN] and len(webhook.posts) == 1

            inference = start_inference(tmp_path / "inference", linear_model[0],
                                        FASHION_INFERENCE_PORT=inference.address.rsplit(":", 1)[1])
            inference.wait_serving()
            wait_until(lambda: len(api_mail(smtp_inbox)) == 2 and len(webhook.posts) == 2, 30,
                       "the resolution email and Slack message", monitor.output)
            time.sleep(1.0)
            assert api_mail(smtp_inbox) == [API_DOWN, API_RESOLVED]
            assert "RESOLVED after" in smtp_inbox.messages[-1].get_content()
            assert str(webhook.posts[1]["text"]).startswith(":white_check_mark: *[INFO] Resolved: API Down*")
            listing = client.alerts(rule="api_down")
            assert list(listing.active) == []
            assert [(e.kind, e.notified) for e in listing.history] == [("resolved", True), ("fired", True)]
            assert listing.pending_notifications == 0
        assert health_status(monitor.address) == "SERVING"
        # The webhook URL is a secret: it never reaches the logs.
        logs = monitor.output() + (tmp_path / "monitor" / "logs" / "monitor.log").read_text()
        assert "webhook-secret-token" not in logs
    finally:
        inference.kill()
        if monitor is not None:
            monitor.kill()


def test_a_failing_mail_server_is_logged_and_retried_until_it_takes_the_alert(tmp_path: Path) -> None:
    smtp_port = free_port()
    env = monitor_env(tmp_path, unused_address(), unused_address(), FASHION_SMTP_HOST="127.0.0.1",
                      FASHION_SMTP_PORT=str(smtp_port), FASHION_SMTP_TO="ops@fashion.example",
                      FASHION_ALERT_DISABLED_RULES=QUIET)
    monitor = start_monitor(tmp_path, env)
    inbox = SmtpInbox(smtp_port, [], [])
    try:
        wait_until(lambda: "failed (attempt 2)" in monitor.output(), 20, "two failed delivery attempts",
                   monitor.output)
        out = monitor.output()
        assert "email notification '[CRITICAL] API Down' failed (attempt 1)" in out
        assert "Connection refused" in out and "retrying in" in out
        assert health_status(monitor.address) == "SERVING"
        with MonitorClient(monitor.address) as client:
            assert client.alerts().pending_notifications == 1
        inbox.start(auth_require_tls=False)  # the mail server is back
        wait_until(lambda: inbox.subjects(), 20, "the retried email", monitor.output)
        assert inbox.subjects() == [API_DOWN]
        wait_until(lambda: "Sent email notification '[CRITICAL] API Down'" in monitor.output(), 10,
                   "the delivery to be logged", monitor.output)
        assert monitor.proc.poll() is None
    finally:
        inbox.stop()
        monitor.kill()


def test_scheduled_report_is_emailed_with_the_dashboard_attached(
        tmp_path: Path, smtp_inbox: SmtpInbox, webhook: WebhookReceiver) -> None:
    env = monitor_env(tmp_path, unused_address(), unused_address(), FASHION_SMTP_HOST="127.0.0.1",
                      FASHION_SMTP_PORT=str(smtp_inbox.port), FASHION_SMTP_TO="ops@fashion.example",
                      FASHION_SLACK_WEBHOOK_URL=webhook.url, FASHION_REPORT_CRON="* * * * * */2",
                      FASHION_MONITOR_CHECK_INTERVAL_S="30")
    monitor = start_monitor(tmp_path, env)
    try:
        wait_until(lambda: any(s.startswith("Monitoring Report") for s in smtp_inbox.subjects()), 30,
                   "the scheduled report email", monitor.output)
        mail = next(m for m in smtp_inbox.messages if str(m["Subject"]).startswith("Monitoring Report"))
        assert str(mail["Subject"]).endswith("(UNHEALTHY)")  # nothing is running
        body = mail.get_body(("plain",)).get_content()
        assert body.startswith("FASHION CLASSIFIER - MONITORING REPORT") and "BATCH STATISTICS (Last 7 Days):" in body
        (page,) = list(mail.iter_attachments())
        assert page.get_content_type() == "text/html" and page.get_filename().startswith("dashboard_")
        assert page.get_content().count("data:image/png;base64,") == 4
        wait_until(lambda: any(t.startswith(":bar_chart: *Monitoring Report") for t in webhook.texts()), 10,
                   "the report on Slack", monitor.output)
        assert list((tmp_path / "reports").glob("report_*.txt"))
    finally:
        monitor.kill()


def test_fashion_monitor_test_alert_reaches_email_and_slack(tmp_path: Path, smtp_inbox: SmtpInbox,
                                                            webhook: WebhookReceiver) -> None:
    """`fashion monitor test-alert` sends through the Monitor service's notifiers now and says how each went."""
    env = monitor_env(tmp_path, unused_address(), unused_address(), FASHION_SMTP_HOST="127.0.0.1",
                      FASHION_SMTP_PORT=str(smtp_inbox.port), FASHION_SMTP_TO="ops@fashion.example",
                      FASHION_SLACK_WEBHOOK_URL=webhook.url, FASHION_ALERT_DISABLED_RULES=QUIET + ",api_down,"
                      "model_load_failure")
    monitor = start_monitor(tmp_path, env)
    try:
        run = fashion("test-alert", "--address", monitor.address, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "✓ email (ops@fashion.example): test alert sent" in run.stdout
        assert "✓ slack (127.0.0.1): test alert sent" in run.stdout
        assert smtp_inbox.subjects() == ["[INFO] Test alert from the Fashion Classifier monitor"]
        assert "fashion monitor test-alert" in smtp_inbox.messages[0].get_content()
        assert len(webhook.posts) == 1 and "Test alert" in webhook.texts()[0]

        webhook.fail_with.append(500)  # one channel failing: said, exit 1, the other still delivered
        run = fashion("test-alert", "--address", monitor.address, "--channel", "slack", cwd=tmp_path)
        assert run.returncode == 1 and "✗ slack (127.0.0.1): not delivered: Slack webhook answered HTTP 500" \
            in run.stdout, run.stdout
        assert len(smtp_inbox.messages) == 1 and "webhook-secret-token" not in run.stdout
    finally:
        monitor.terminate()


def test_test_alert_without_a_notifier_says_what_to_set(tmp_path: Path) -> None:
    monitor = start_monitor(tmp_path, monitor_env(tmp_path, unused_address(), unused_address()))
    try:
        run = fashion("test-alert", "--address", monitor.address, "--channel", "email", cwd=tmp_path)
    finally:
        monitor.terminate()
    assert run.returncode == 2 and "FAILED_PRECONDITION" in run.stderr and "FASHION_SMTP_HOST" in run.stderr

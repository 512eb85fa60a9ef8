"""Email and Slack notifiers against real servers on loopback (aiosmtpd, http.server), and the
outbox that retries a failing notifier without ever raising."""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.common.config import MonitorSettings
from services.monitor.notifiers import (
    EmailNotifier,
    Notification,
    NotificationError,
    NotificationOutbox,
    SlackNotifier,
    build_notifiers,
)
from services.monitor.store import AlertRecord, MonitorStore
from tests.monitor.conftest import SmtpInbox, WebhookReceiver
from tests.support import free_port

PASSWORD = "s3cret-pa55"
FIRED = Notification("api_down", "API Down", "CRITICAL", "fired",
                     "Inference service at localhost:50051 unreachable (UNAVAILABLE: Connection refused)",
                     at=1_760_000_000.0, started_at=1_760_000_000.0,
                     condition="the Inference service's grpc.health.v1 check fails", host="test-host")
RESOLVED = Notification("api_down", "API Down", "CRITICAL", "resolved", "Inference service answers SERVING",
                        at=1_760_000_303.0, started_at=1_760_000_000.0, host="test-host")


def email_settings(inbox_port: int, **extra: object) -> MonitorSettings:
    values: dict[str, object] = dict(smtp_host="127.0.0.1", smtp_port=inbox_port, smtp_starttls=False,
                                     smtp_from="alerts@fashion.example", smtp_to=["ops@fashion.example",
                                                                                  "oncall@fashion.example"],
                                     notify_timeout_s=5)
    values.update(extra)
    return MonitorSettings(**values)  # type: ignore[arg-type]


def test_email_in_the_seed_format(smtp_inbox: SmtpInbox) -> None:
    EmailNotifier(email_settings(smtp_inbox.port)).send(FIRED)
    EmailNotifier(email_settings(smtp_inbox.port)).send(RESOLVED)
    fired, resolved = smtp_inbox.messages
    assert fired["Subject"] == "[CRITICAL] API Down"
    assert fired["From"] == "alerts@fashion.example"
    assert fired["To"] == "ops@fashion.example, oncall@fashion.example"
    assert fired["Date"] and fired["Message-ID"]
    body = fired.get_content()
    assert "Severity: CRITICAL" in body and "Status: FIRING" in body
    assert "unreachable (UNAVAILABLE: Connection refused)" in body and "Rule: api_down" in body
    assert resolved["Subject"] == "[INFO] Resolved: API Down"
    assert "RESOLVED after 5 min 3 s" in resolved.get_content()


def test_email_over_starttls_with_login_from_a_secrets_file(
        tls_cert: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = tls_cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    inbox = SmtpInbox(free_port(), [], []).start(tls_context=ctx, require_starttls=True)
    secret = tmp_path / "smtp_password"
    secret.write_text(PASSWORD + "\n")
    try:
        settings = email_settings(inbox.port, smtp_starttls=True, smtp_ca_file=cert, smtp_user="alerts",
                                  smtp_password_file=secret)
        with caplog.at_level(logging.DEBUG):
            EmailNotifier(settings).send(FIRED)
            assert inbox.logins == [("alerts", PASSWORD)]
            assert inbox.subjects() == ["[CRITICAL] API Down"]
            secret.write_text("wrong-" + PASSWORD)  # rotated badly: read again at the next send
            with pytest.raises(NotificationError) as err:
                EmailNotifier(settings).send(FIRED)
        assert "SMTPAuthenticationError" in str(err.value)
        assert PASSWORD not in str(err.value) and PASSWORD not in caplog.text
        # A login without TLS is refused before anything is sent: no password ever crosses in clear text.
        logins = len(inbox.logins)
        with pytest.raises(ValueError, match="FASHION_SMTP_STARTTLS=true"):
            EmailNotifier(email_settings(inbox.port, smtp_user="alerts", smtp_password=SecretStr(PASSWORD)))
        # Allowed explicitly, it is tried; this server offers no login without TLS, and says so.
        with pytest.raises(NotificationError, match="offers no login without TLS"):
            EmailNotifier(email_settings(inbox.port, smtp_user="alerts", smtp_password=SecretStr(PASSWORD),
                                         smtp_allow_plaintext_auth=True)).send(FIRED)
        assert len(inbox.logins) == logins  # no password sent without TLS
    finally:
        inbox.stop()


def test_email_to_a_server_that_is_down_raises_a_clear_error() -> None:
    with pytest.raises(NotificationError, match=r"Connection refused|ConnectionRefused"):
        EmailNotifier(email_settings(free_port())).send(FIRED)


def test_slack_payload_is_the_seeds(webhook: WebhookReceiver) -> None:
    slack = SlackNotifier(MonitorSettings(slack_webhook_url=SecretStr(webhook.url)))
    slack.send(FIRED)
    slack.send(RESOLVED)
    fired, resolved = webhook.posts
    assert set(fired) == {"text", "username", "icon_emoji"}
    assert fired["username"] == "Fashion Classifier Bot" and fired["icon_emoji"] == ":robot_face:"
    assert str(fired["text"]).startswith(":rotating_light: *[CRITICAL] API Down*\n")
    assert "unreachable" in str(fired["text"])
    assert str(resolved["text"]).startswith(":white_check_mark: *[INFO] Resolved: API Down*")
    assert webhook.paths == ["/services/T0001/B0001/webhook-secret-token"] * 2


def test_slack_failures_are_errors_that_never_show_the_url(webhook: WebhookReceiver, tmp_path: Path) -> None:
    url_file = tmp_path / "slack_url"
    url_file.write_text(webhook.url)
    slack = SlackNotifier(MonitorSettings(slack_webhook_url_file=url_file))
    webhook.fail_with.append(404)
    with pytest.raises(NotificationError, match="HTTP 404: no_service"):
        slack.send(FIRED)
    dead = f"http://127.0.0.1:{free_port()}/services/T0001/B0001/other-secret-token"
    url_file.write_text(dead)
    with pytest.raises(NotificationError) as err:
        slack.send(FIRED)
    assert "other-secret-token" not in str(err.value) and "Connection refused" in str(err.value)
    with pytest.raises(ValueError, match="https://"):
        SlackNotifier(MonitorSettings(slack_webhook_url=SecretStr("ftp://hooks.example/x")))


def test_build_notifiers_from_settings(webhook: WebhookReceiver) -> None:
    assert build_notifiers(MonitorSettings()) == {}
    both = build_notifiers(MonitorSettings(smtp_host="127.0.0.1", smtp_to=["a@b.c"],
                                           slack_webhook_url=SecretStr(webhook.url)))
    assert sorted(both) == ["email", "slack"]
    with pytest.raises(ValueError, match="FASHION_SMTP_TO"):
        build_notifiers(MonitorSettings(smtp_host="127.0.0.1"))


def _queue(store: MonitorStore, *items: tuple[str, Notification]) -> None:
    store.save(AlertRecord("api_down", "API Down", "CRITICAL"), notifications=[(n, x.to_json()) for n, x in items])


def test_outbox_retries_a_failing_notifier_in_order_while_the_others_deliver(
        tmp_path: Path, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    settings = email_settings(port, slack_webhook_url=SecretStr(webhook.url), notify_retry_initial_s=0.2,
                              notify_retry_max_s=0.5)
    store = MonitorStore(tmp_path / "m.db")
    outbox = NotificationOutbox(store, build_notifiers(settings), settings)
    _queue(store, ("email", FIRED), ("slack", FIRED))
    _queue(store, ("email", RESOLVED), ("slack", RESOLVED))
    with caplog.at_level(logging.WARNING):
        assert outbox.deliver_due() == 2  # Slack delivers both; email is down
    assert webhook.texts()[0].startswith(":rotating_light:") and "Resolved" in webhook.texts()[1]
    assert "email notification '[CRITICAL] API Down' failed (attempt 1)" in caplog.text
    assert "retrying in 0.2 s" in caplog.text
    assert store.outbox_size() == 2
    assert outbox.deliver_due() == 0  # not due yet: no attempt
    time.sleep(0.25)
    assert outbox.deliver_due() == 0
    assert "(attempt 2)" in caplog.text and "retrying in 0.4 s" in caplog.text
    inbox = SmtpInbox(port, [], []).start(auth_require_tls=False)  # the mail server comes back
    try:
        time.sleep(0.45)
        assert outbox.deliver_due() == 2
        assert inbox.subjects() == ["[CRITICAL] API Down", "[INFO] Resolved: API Down"]  # in order
    finally:
        inbox.stop()
    assert store.outbox_size() == 0


def test_outbox_gives_up_after_the_configured_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = email_settings(free_port(), notify_give_up_h=1e-9)
    store = MonitorStore(tmp_path / "m.db")
    _queue(store, ("email", FIRED))
    time.sleep(0.01)
    with caplog.at_level(logging.ERROR):
        assert NotificationOutbox(store, build_notifiers(settings), settings).deliver_due() == 0
    assert "Dropping email notification '[CRITICAL] API Down' after 1 failed attempts" in caplog.text
    assert store.outbox_size() == 0


def test_notifier_secrets_never_reach_logs_outbox_rows_or_errors(
        tmp_path: Path, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture) -> None:
    """Every way a webhook secret turned bad at run time: each send fails with a reason that names no
    part of it, and neither the log, the outbox rows in the database nor any error text holds it."""
    secret = "leaky-webhook-secret-9z"
    url_file = tmp_path / "slack_url"
    url_file.write_text(webhook.url)
    settings = MonitorSettings(slack_webhook_url_file=url_file, notify_retry_initial_s=0.01, notify_timeout_s=2)
    store = MonitorStore(tmp_path / "monitor.db")
    slack = SlackNotifier(settings)
    outbox = NotificationOutbox(store, {"slack": slack}, settings)
    errors: list[str] = []
    bad_urls = {  # URL -> refused at start too (its form is wrong), not only when sending
        f"hooks.slack.com/services/T0/B0/{secret}": True,  # no scheme: urllib's own error quotes the URL
        f"http://hooks.slack.com/services/T0/B0/{secret}": True,  # not https, not loopback
        f"https://127.0.0.1:{free_port()}/services/T0/B0/{secret}": False,  # nothing listens there
        f"https://hooks.slack.com:badport/services/{secret}": False,  # urllib's error names the port
        f"ftp://{secret}.example/x": True,
    }
    with caplog.at_level(logging.DEBUG):
        for bad, wrong_form in bad_urls.items():
            url_file.write_text(bad)
            with pytest.raises(NotificationError) as err:
                slack.send(FIRED)
            errors.append(str(err.value))
            _queue(store, ("slack", FIRED))
            time.sleep(0.02)
            assert outbox.deliver_due() == 0
            if wrong_form:
                with pytest.raises(ValueError) as refused:  # the same URL at start: refused, never quoted
                    SlackNotifier(settings)
                errors.append(str(refused.value))
    assert "must start with https://" in errors[0] and "loopback" in errors[2]
    assert "Connection refused" in errors[4]
    assert not [e for e in errors if secret in e], errors
    assert secret not in caplog.text
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("monitor.db*"))
    assert secret.encode() not in stored
    assert store.outbox_size() == len(bad_urls)  # still queued, delivered once the secret is right again
    url_file.write_text(webhook.url)
    time.sleep(0.4)
    assert outbox.deliver_due() == len(bad_urls) and len(webhook.texts()) == len(bad_urls)

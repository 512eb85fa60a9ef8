"""Delivery faults of the notifiers and the outbox, against real servers on loopback: a relay whose
error page quotes the webhook URL, a redirecting relay, Slack's 429 with Retry-After, mail servers
that refuse a message or a recipient for good, a slow mail server while the Monitor service is
stopped with SIGTERM, and what the messages themselves carry (Slack escaping, email headers)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from pydantic import SecretStr

from fashion.client import MonitorClient
from services.common import metrics
from services.common.config import MonitorSettings, load_settings
from services.monitor.notifiers import (
    EmailNotifier,
    Notification,
    NotificationError,
    NotificationOutbox,
    SlackNotifier,
)
from services.monitor.store import MonitorStore
from tests.monitor.conftest import (
    SmtpInbox,
    WebhookReceiver,
    monitor_env,
    start_monitor,
    unused_address,
    wait_until,
)
from tests.monitor.test_alerting import QUIET
from tests.monitor.test_cli import fashion
from tests.monitor.test_notifiers import FIRED, email_settings
from tests.support import free_port, serving

pytestmark = pytest.mark.timeout(180)

TOKEN = "SuperSecretToken123"
SMTPS = 465
"""The implicit-TLS port FASHION_SMTP_SSL=true uses when FASHION_SMTP_PORT is unset."""
REPORT = Notification("report", "Monitoring Report 2025-10-09 09:00 (HEALTHY)", "INFO", "report",
                      "FASHION CLASSIFIER - MONITORING REPORT\n", at=1_760_000_000.0, started_at=1_760_000_000.0)


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    """May quote the request path as {path}, as an Apache-style error page does."""


@dataclass
class Relay:
    """A real HTTP server standing in for Slack or a relay in front of it: answers POSTs with the
    scripted replies, first first (then 200 "ok"), and records every request."""

    server: ThreadingHTTPServer
    replies: list[Reply]
    requests: list[tuple[str, str]]
    """(method, path) of each request."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T0000/B0000/{TOKEN}"

    def posts(self) -> int:
        return sum(1 for method, _ in list(self.requests) if method == "POST")


@pytest.fixture
def relay() -> Iterator[Relay]:
    state: Relay

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, reply: Reply) -> None:
            body = reply.body.format(path=self.path).encode()
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(("POST", self.path))
            self._answer(state.replies.pop(0) if state.replies else Reply(200, body="ok"))

        def do_GET(self) -> None:  # where a followed redirect would land: it "succeeds"
            state.requests.append(("GET", self.path))
            self._answer(Reply(200, body="ok"))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Relay(server, [], [])
    with serving(server):
        yield state


def not_found_page(status: int = 404) -> Reply:
    return Reply(status, {"Content-Type": "text/html"},
                 "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\n<html><head><title>Not Found</title></head>"
                 "<body><h1>Not Found</h1><p>The requested URL {path} was not found on this server.</p></body></html>")


def dropped(notifier: str) -> float:
    return metrics.MONITOR_NOTIFICATIONS.labels(notifier, "dropped")._value.get()


def slack_outbox(tmp_path: Path, url: str, **extra: object) -> tuple[MonitorStore, NotificationOutbox]:
    settings = MonitorSettings(slack_webhook_url=SecretStr(url), **extra)  # type: ignore[arg-type]
    store = MonitorStore(tmp_path / "monitor.db")
    return store, NotificationOutbox(store, {"slack": SlackNotifier(settings)}, settings)


def test_an_error_page_quoting_the_webhook_path_never_shows_the_secret(
        tmp_path: Path, relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    """A relay's 404/503 page quotes the path, which holds the token: the error, the log, the outbox row
    and `fashion monitor test-alert` show the status and the page's words, never a part of the URL."""
    store, outbox = slack_outbox(tmp_path, relay.url, notify_retry_initial_s=0.01)
    relay.replies += [not_found_page(), not_found_page(503), not_found_page()]
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(NotificationError) as err:
            outbox.notifiers["slack"].send(FIRED)
        store.enqueue([("slack", FIRED.to_json())])
        assert outbox.deliver_due() == 0  # the 503: temporary, kept with its error
        (row,) = store.outbox_heads()
    assert "HTTP 404" in str(err.value) and "was not found on this server" in str(err.value)
    assert "HTTP 503" in row.last_error and "was not found" in row.last_error
    for text in (str(err.value), caplog.text, row.last_error):
        assert TOKEN not in text and "T0000/B0000" not in text, text
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("monitor.db*"))
    assert TOKEN.encode() not in stored

    run = fashion("test-alert", "--embedded", "--channel", "slack", cwd=tmp_path,
                  FASHION_SLACK_WEBHOOK_URL=relay.url, FASHION_LOG_DIR=str(tmp_path / "logs"))
    assert run.returncode == 1 and "not delivered: Slack webhook answered HTTP 404" in run.stdout, run.stdout
    assert TOKEN not in run.stdout + run.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert TOKEN not in logs


def test_a_redirect_is_not_followed_and_the_alert_stays_queued(
        tmp_path: Path, relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    """urllib would turn a 302 into a body-less GET whose 200 passes for a delivery."""
    store, outbox = slack_outbox(tmp_path, relay.url)
    relay.replies.append(Reply(302, {"Location": "/landing"}))
    store.enqueue([("slack", FIRED.to_json())])
    with caplog.at_level(logging.WARNING):
        assert outbox.deliver_due() == 0
    assert relay.requests == [("POST", f"/services/T0000/B0000/{TOKEN}")]  # no GET /landing
    (row,) = store.outbox_heads()
    assert row.attempts == 1 and "HTTP 302, a redirect" in row.last_error
    assert "slack notification '[CRITICAL] API Down' failed (attempt 1): Slack webhook answered HTTP 302" \
        in caplog.text


@pytest.mark.parametrize(("status", "permanent"), [(400, True), (404, True), (410, True), (403, True),
                                                   (408, False), (429, False), (500, False), (503, False)])
def test_slack_client_errors_drop_the_message_and_let_the_next_one_go(
        tmp_path: Path, relay: Relay, caplog: pytest.LogCaptureFixture, status: int, permanent: bool) -> None:
    store, outbox = slack_outbox(tmp_path, relay.url)
    relay.replies.append(Reply(status, body="invalid_payload"))
    store.enqueue([("slack", REPORT.to_json())])
    store.enqueue([("slack", FIRED.to_json())])
    before = dropped("slack")
    with caplog.at_level(logging.WARNING):
        delivered = outbox.deliver_due()
    if permanent:  # the report is dropped with an error; the alert behind it goes out in the same pass
        assert delivered == 1 and relay.posts() == 2 and store.outbox_size() == 0
        assert f"Dropping slack notification '{REPORT.subject}' after attempt 1: refused for good" in caplog.text
        assert [r.levelname for r in caplog.records if "Dropping" in r.message] == ["ERROR"]
        assert dropped("slack") == before + 1
    else:  # retried in order: the alert still waits behind the report
        assert delivered == 0 and relay.posts() == 1 and store.outbox_size() == 2
        assert "Dropping" not in caplog.text and dropped("slack") == before


def test_429_retry_after_sets_the_next_attempt_capped_by_the_longest_backoff(
        tmp_path: Path, relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    store, outbox = slack_outbox(tmp_path, relay.url, notify_retry_initial_s=0.2, notify_retry_max_s=60)
    relay.replies += [Reply(429, {"Retry-After": "30"}), Reply(429, {"Retry-After": "3600"})]
    store.enqueue([("slack", FIRED.to_json())])
    with caplog.at_level(logging.WARNING):
        started = time.time()
        assert outbox.deliver_due() == 0
        (row,) = store.outbox_heads()
        assert 29 <= row.next_attempt_at - started <= 31  # the server's 30 s, not the 0.2 s backoff
        assert "retrying in 30.0 s (the server's Retry-After)" in caplog.text
        assert outbox.deliver_due() == 0 and relay.posts() == 1  # not due: no second request
        store.outbox_retry(row.id, 0.0, row.last_error)  # make it due now
        started = time.time()
        assert outbox.deliver_due() == 0
        (row,) = store.outbox_heads()
        assert 59 <= row.next_attempt_at - started <= 61  # an hour asked, capped at notify_retry_max_s
    assert relay.posts() == 2


@dataclass
class PickyMailServer:
    """A real SMTP server (aiosmtpd) refusing what `refuse` says, at RCPT (per address) or DATA."""

    port: int
    rcpt_replies: dict[str, str]
    data_replies: list[str]
    delivered: list[tuple[list[str], bytes]] = field(default_factory=list)
    controller: Controller | None = None

    def start(self, **server_kw: object) -> PickyMailServer:
        server = self

        class Handler:
            async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
                if address in server.rcpt_replies:
                    return server.rcpt_replies[address]
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, smtp, session, envelope):  # type: ignore[no-untyped-def]
                if server.data_replies:
                    return server.data_replies.pop(0)
                server.delivered.append((list(envelope.rcpt_tos), envelope.content))
                return "250 Message accepted for delivery"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **server_kw)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()


@pytest.fixture
def mail_server() -> Iterator[PickyMailServer]:
    server = PickyMailServer(free_port(), {}, [])
    try:
        yield server
    finally:
        server.stop()


def email_outbox(tmp_path: Path, port: int) -> tuple[MonitorStore, NotificationOutbox]:
    settings = email_settings(port, notify_retry_initial_s=0.2)
    store = MonitorStore(tmp_path / "monitor.db")
    return store, NotificationOutbox(store, {"email": EmailNotifier(settings)}, settings)


def test_a_report_rejected_as_too_large_does_not_hold_back_the_alert_behind_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server's 552 to the report's size is final: the report is dropped (an error), and the
    CRITICAL alert queued after it is delivered at once instead of waiting up to a day behind it."""
    inbox = SmtpInbox(free_port(), [], []).start(auth_require_tls=False, data_size_limit=60_000)
    page = tmp_path / "dashboard_20251009_090000.html"
    page.write_text("<html>" + "A" * 200_000 + "</html>")
    try:
        store, outbox = email_outbox(tmp_path, inbox.port)
        store.enqueue([("email", replace(REPORT, attachment=str(page)).to_json())])
        store.enqueue([("email", FIRED.to_json())])
        before = dropped("email")
        with caplog.at_level(logging.INFO):
            assert outbox.deliver_due() == 1
        assert inbox.subjects() == ["[CRITICAL] API Down"]
    finally:
        inbox.stop()
    assert store.outbox_size() == 0 and dropped("email") == before + 1
    (drop,) = [r for r in caplog.records if r.message.startswith("Dropping")]
    assert drop.levelname == "ERROR" and REPORT.subject in drop.message and "552" in drop.message


def test_smtp_permanent_replies_drop_and_temporary_ones_retry(
        tmp_path: Path, mail_server: PickyMailServer, caplog: pytest.LogCaptureFixture) -> None:
    mail_server.data_replies += ["451 4.3.0 try again later", "554 5.7.1 message refused as spam"]
    mail_server.start()
    store, outbox = email_outbox(tmp_path, mail_server.port)
    store.enqueue([("email", REPORT.to_json())])
    store.enqueue([("email", FIRED.to_json())])
    with caplog.at_level(logging.WARNING):
        assert outbox.deliver_due() == 0  # 451: temporary, both stay queued in order
        assert store.outbox_size() == 2 and "Dropping" not in caplog.text
        (row,) = store.outbox_heads()
        store.outbox_retry(row.id, 0.0, row.last_error)  # make it due now
        assert outbox.deliver_due() == 1  # 554: the report is dropped, the alert goes out
    assert [m for _, m in mail_server.delivered if b"[CRITICAL] API Down" in m]
    assert "Dropping email notification" in caplog.text and "554" in caplog.text
    assert store.outbox_size() == 0


def test_every_recipient_refused_for_good_drops_the_message(
        tmp_path: Path, mail_server: PickyMailServer, caplog: pytest.LogCaptureFixture) -> None:
    mail_server.rcpt_replies.update({"ops@fashion.example": "550 5.1.1 no such user",
                                     "oncall@fashion.example": "550 5.1.1 no such user"})
    mail_server.start()
    store, outbox = email_outbox(tmp_path, mail_server.port)
    store.enqueue([("email", FIRED.to_json())])
    with caplog.at_level(logging.ERROR):
        assert outbox.deliver_due() == 0
    assert store.outbox_size() == 0 and "SMTPRecipientsRefused" in caplog.text


def test_a_refused_recipient_is_logged_and_the_others_get_the_alert(
        mail_server: PickyMailServer, caplog: pytest.LogCaptureFixture) -> None:
    mail_server.rcpt_replies["oncall@fashion.example"] = "550 5.1.1 <oncall@fashion.example>: no such user"
    mail_server.start()
    with caplog.at_level(logging.WARNING):
        EmailNotifier(email_settings(mail_server.port)).send(FIRED)
    ((recipients, _),) = mail_server.delivered
    assert recipients == ["ops@fashion.example"]
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "oncall@fashion.example" in warning.message and "550" in warning.message
    assert "[CRITICAL] API Down" in warning.message


def test_alert_emails_say_they_are_auto_generated(smtp_inbox: SmtpInbox) -> None:
    EmailNotifier(email_settings(smtp_inbox.port)).send(FIRED)
    (mail,) = smtp_inbox.messages
    assert mail["Auto-Submitted"] == "auto-generated"  # RFC 3834: no out-of-office replies


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:  # taken, or a privileged port and not root
            return False
    return True


def test_implicit_tls_without_a_port_uses_465(
        tls_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """FASHION_SMTP_SSL=true alone reaches an SMTPS server on 465 (not 587, where TLS from the first
    byte fails every send); a port that is set wins."""
    if not port_is_free(SMTPS):
        pytest.skip(f"port {SMTPS} cannot be bound here")
    cert, key = tls_cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    inbox = SmtpInbox(SMTPS, [], []).start(ssl_context=context)
    try:
        for name, value in {"FASHION_SMTP_HOST": "127.0.0.1", "FASHION_SMTP_TO": "ops@fashion.example",
                            "FASHION_SMTP_SSL": "true", "FASHION_SMTP_CA_FILE": str(cert)}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("FASHION_SMTP_PORT", raising=False)
        EmailNotifier(load_settings(MonitorSettings)).send(FIRED)
        assert inbox.subjects() == ["[CRITICAL] API Down"]
    finally:
        inbox.stop()
    monkeypatch.setenv("FASHION_SMTP_SSL", "false")
    assert EmailNotifier(load_settings(MonitorSettings)).port == 587
    monkeypatch.setenv("FASHION_SMTP_PORT", "2465")
    assert EmailNotifier(load_settings(MonitorSettings)).port == 2465


def test_slack_text_is_escaped_and_cannot_leave_its_code_block(webhook: WebhookReceiver) -> None:
    slack = SlackNotifier(MonitorSettings(slack_webhook_url=SecretStr(webhook.url)))
    alert = Notification("disk_space_low", "Disk <space> & low", "WARNING", "fired",
                         "Disk of /data/<!channel>.jpg & <https://evil.example|click> has 5% free", at=1.0,
                         started_at=1.0)
    report = Notification("report", "Monitoring Report", "INFO", "report",
                          "files: a```<!here>```b\nlast`", at=1.0, started_at=1.0)
    slack.send(alert)
    slack.send(report)
    alert_text, report_text = webhook.texts()
    assert alert_text == (":warning: *[WARNING] Disk &lt;space&gt; &amp; low*\nDisk of /data/&lt;!channel&gt;.jpg "
                          "&amp; &lt;https://evil.example|click&gt; has 5% free")
    assert "<" not in alert_text and ">" not in alert_text
    assert report_text.startswith(":bar_chart: *Monitoring Report*\n```\n") and report_text.endswith("```")
    assert report_text.count("```") == 2  # only the block's own fences
    assert "&lt;!here&gt;" in report_text and "<!here>" not in report_text
    assert report_text.replace("\u200b", "") == ":bar_chart: *Monitoring Report*\n```\nfiles: a```&lt;!here&gt;" \
                                                 "```b\nlast````"


class SlowMailServer:
    """A real SMTP server that takes `delay` seconds to accept each message (it holds its reply to
    DATA), recording the subjects it accepted."""

    def __init__(self, delay: float) -> None:
        self.port = free_port()
        self.delay = delay
        self.accepted: list[str] = []
        self.receiving = threading.Event()
        server = self

        class Handler:
            async def handle_DATA(self, smtp, session, envelope):  # type: ignore[no-untyped-def]
                server.receiving.set()
                await asyncio.sleep(server.delay)
                subject = next((line for line in envelope.content.decode(errors="replace").splitlines()
                                if line.startswith("Subject: ")), "")
                server.accepted.append(subject.removeprefix("Subject: "))
                return "250 Message accepted for delivery"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SlowMailServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def test_sigterm_during_a_slow_send_then_a_restart_sends_the_alert_exactly_once(tmp_path: Path) -> None:
    """The Monitor service is stopped while the mail server holds its reply to the alert: the stop waits
    for that delivery to be recorded, so the restarted service does not send it again."""
    with SlowMailServer(delay=2.0) as mail:
        env = monitor_env(tmp_path, unused_address(), unused_address(), FASHION_SMTP_HOST="127.0.0.1",
                          FASHION_SMTP_PORT=str(mail.port), FASHION_SMTP_TO="ops@fashion.example",
                          FASHION_NOTIFY_TIMEOUT_S="15",
                          FASHION_ALERT_DISABLED_RULES=QUIET + ",model_load_failure")
        monitor = start_monitor(tmp_path, env)
        try:
            wait_until(mail.receiving.is_set, 30, "the alert email to reach the mail server", monitor.output)
            assert monitor.terminate(timeout=60) == 0, monitor.output()
            assert mail.accepted == ["[CRITICAL] API Down"]
            assert "Sent email notification '[CRITICAL] API Down'" in monitor.output()

            monitor = start_monitor(tmp_path, env)
            with MonitorClient(monitor.address) as client:
                listing = client.alerts()
                assert [a.rule for a in listing.active] == ["api_down"]  # still firing, remembered
                # Nothing left to send: an alert still queued would be sent a second time now.
                wait_until(lambda: client.alerts().pending_notifications == 0, 30, "an empty outbox",
                           monitor.output)
            assert mail.accepted == ["[CRITICAL] API Down"], "sent exactly once across the restart"
        finally:
            monitor.kill()

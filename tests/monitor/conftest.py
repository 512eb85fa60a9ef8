"""Fixtures of the Monitor tests: a real SMTP server (aiosmtpd) and a real HTTP server standing in
for Slack's incoming webhook, both on loopback; Monitor service processes on real ports."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support import ServiceProcess, free_port, serving, start_service


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               detail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(0.05)


@dataclass
class SmtpInbox:
    """Mail received by a real SMTP server on 127.0.0.1."""

    port: int
    messages: list[EmailMessage]
    logins: list[tuple[str, str]]
    controller: Controller | None = None

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in list(self.messages)]

    def start(self, **controller_kw: object) -> SmtpInbox:
        inbox = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
                inbox.messages.append(msg)  # type: ignore[arg-type]
                return "250 Message accepted for delivery"

        def authenticate(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
            assert isinstance(auth_data, LoginPassword)
            inbox.logins.append((auth_data.login.decode(), auth_data.password.decode()))
            return AuthResult(success=auth_data.password == b"s3cret-pa55", handled=False)

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port,
                                     authenticator=authenticate, **controller_kw)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def smtp_inbox() -> Iterator[SmtpInbox]:
    inbox = SmtpInbox(free_port(), [], []).start(auth_require_tls=False)
    try:
        yield inbox
    finally:
        inbox.stop()


@dataclass
class WebhookReceiver:
    """A real HTTP server recording JSON POSTs, as Slack's incoming webhook would receive them."""

    server: ThreadingHTTPServer
    posts: list[dict[str, object]]
    paths: list[str]
    fail_with: list[int]
    """Status codes to answer the next requests with, first first (then 200 "ok")."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T0001/B0001/webhook-secret-token"

    def texts(self) -> list[str]:
        return [str(p["text"]) for p in list(self.posts)]


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver: WebhookReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if receiver.fail_with:
                code = receiver.fail_with.pop(0)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"no_service")
                return
            receiver.paths.append(self.path)
            receiver.posts.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = WebhookReceiver(server, [], [], [])
    with serving(server):
        yield receiver


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), for STARTTLS."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


def monitor_env(workdir: Path, inference_address: str, batch_address: str, **extra: str) -> dict[str, str]:
    """Settings of a quick Monitor: checks every 0.3 s, no confirmation delay, short retries."""
    return {
        "FASHION_MONITOR_HOST": "127.0.0.1",
        "FASHION_MONITOR_PORT": str(free_port()),
        "FASHION_MONITOR_METRICS_PORT": "0",
        "FASHION_INFERENCE_ADDRESS": inference_address,
        "FASHION_BATCH_ADDRESS": batch_address,
        "FASHION_GATEWAY_ADDRESS": "",  # no gateway here unless a test starts one and says where
        "FASHION_MONITOR_CHECK_INTERVAL_S": "0.3",
        "FASHION_MONITOR_CHECK_TIMEOUT_S": "2",
        "FASHION_ALERT_CONFIRM_CHECKS": "1",
        "FASHION_ALERT_COOLDOWN_S": "0",
        "FASHION_NOTIFY_RETRY_INITIAL_S": "0.2",
        "FASHION_NOTIFY_RETRY_MAX_S": "1",
        "FASHION_NOTIFY_TIMEOUT_S": "3",
        "FASHION_SHUTDOWN_GRACE_S": "2",
        "FASHION_MONITOR_STATE_DB": str(workdir / "state" / "monitor.db"),
        "FASHION_REPORT_DIR": str(workdir / "reports"),
        "FASHION_REPORT_FOLDERS": str(workdir),
        "FASHION_LOG_DIR": str(workdir / "logs"),
        "FASHION_SMTP_STARTTLS": "false",
        "OTEL_SDK_DISABLED": "true",
        **extra,
    }


def start_monitor(workdir: Path, env: dict[str, str]) -> ServiceProcess:
    svc = start_service("services.monitor", workdir, env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}")
    svc.wait_serving(timeout=60)
    return svc


def unused_address() -> str:
    """A loopback address where nothing listens."""
    return f"127.0.0.1:{free_port()}"

"""The Monitor service when the world treats it badly: a full or read-only report folder, an alert state
file it cannot open or write, mail servers and webhooks that trickle, never finish or speak garbage,
callers sending megabyte strings, and a wall clock that jumps. Each time: one clear error naming the file
or setting, nothing half-written left, no notification lost or sent twice, and the service serving on."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
from pydantic import SecretStr

from fashion.client import ChannelOptions, MonitorClient
from services.common.config import MonitorSettings
from services.monitor import monitor as monitor_module
from services.monitor.dashboard import ReportFiles
from services.monitor.health import Health
from services.monitor.monitor import Monitor
from services.monitor.notifiers import EmailNotifier, NotificationError, NotificationOutbox, SlackNotifier
from services.monitor.store import MonitorStore
from tests.batch.conftest import fill, tmpfs
from tests.gateway.conftest import start_gateway
from tests.monitor.conftest import monitor_env, start_monitor, unused_address, wait_until
from tests.monitor.test_notifiers import FIRED, RESOLVED, email_settings
from tests.support import changed_command, serving, start_service

pytestmark = pytest.mark.timeout(180)

REPORT_FILES = ("report_*.txt", "dashboard_*.html", "*.png")


def report_files(folder: Path) -> list[str]:
    """Every file in the report folder, hidden and temporary ones too."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def client_of(address: str) -> MonitorClient:
    return MonitorClient(ChannelOptions.from_env(address, retries=1))


# --- the report folder: full, then read-only ---------------------------------------------------------

def test_a_full_report_disk_is_resource_exhausted_naming_the_folder_and_leaves_nothing_half_written(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        reports = disk / "reports"
        monitor = start_monitor(tmp_path, monitor_env(tmp_path, unused_address(), unused_address(),
                                                      FASHION_REPORT_DIR=str(reports)))
        try:
            with client_of(monitor.address) as client:
                client.generate_report(text_only=True)
                before = report_files(reports)
                filler = fill(disk)
                # Room for the text and a chart or two, not for the whole report: it fails part-way.
                os.truncate(filler, filler.stat().st_size - 40 * 1024)
                for text_only in (False, True, False):
                    with pytest.raises(grpc.RpcError) as err:
                        client.generate_report(text_only=text_only)
                    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
                    assert err.value.details() == (f"cannot write the report in {reports} (FASHION_REPORT_DIR): "
                                                   "No space left on device")
                    assert report_files(reports) == before, "a failed report leaves none of its files"
                    fill(disk)  # what the failed report freed again
                assert client.system_health().services  # still serving

                filler.unlink()  # room again: the next report is whole
                report = client.generate_report()
            assert Path(report.html_path).exists() and len(report.chart_paths) == 4
            assert len(report_files(reports)) == len(before) + 6
        finally:
            monitor.terminate()


def test_a_report_folder_it_may_not_write_is_failed_precondition_naming_it(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir(mode=0o555)
    reports.chmod(0o555)
    env = monitor_env(tmp_path, unused_address(), unused_address())
    monitor = start_service("services.monitor", tmp_path, env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}",
                            unprivileged=True)
    try:
        monitor.wait_serving()
        with client_of(monitor.address) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate_report()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
            assert err.value.details() == (f"cannot write the report in {reports} (FASHION_REPORT_DIR): "
                                           "Permission denied")
            assert client.system_health().services
        assert report_files(reports) == []
    finally:
        monitor.terminate()


# --- the alert state file at start -------------------------------------------------------------------

def start_unprivileged(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(changed_command([sys.executable, "-m", "services.monitor"], unprivileged=True), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **monitor_env(tmp_path, unused_address(), unused_address()), **env})


def test_an_alert_state_file_it_cannot_write_stops_the_start_with_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    readonly_db = tmp_path / "readonly.db"
    MonitorStore(readonly_db).close()
    readonly_db.chmod(0o444)
    not_a_database = tmp_path / "garbage.db"
    not_a_database.write_bytes(b"this is no SQLite file" * 100)
    locked.chmod(0o555)
    cases = {
        locked / "state" / "monitor.db": "Permission denied",
        locked / "monitor.db": "unable to open database file; its folder",
        readonly_db: "attempt to write a readonly database",
        not_a_database: "file is not a database",
    }
    for path, reason in cases.items():
        run = start_unprivileged(tmp_path, FASHION_MONITOR_STATE_DB=str(path))
        assert run.returncode == 2, (path, run.stderr)
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: cannot open the alert state file {path} (FASHION_MONITOR_STATE_DB): "), run.stderr
        assert reason in lines[0], run.stderr


# --- the outbox on a full disk -----------------------------------------------------------------------

@pytest.fixture
def webhook_posts() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback webhook answering 200 "ok": its URL and the bodies it received."""
    posts: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}/services/T1/B1/hook-token", posts


def test_a_notification_sent_while_the_state_disk_is_full_is_sent_once(
        tmp_path: Path, webhook_posts: tuple[str, list[bytes]]) -> None:
    """Queued before the disk filled, sent while it is full: its removal from the outbox fails, and the
    outbox must not take it for unsent (every retry would post the alert again)."""
    url, posts = webhook_posts
    settings = MonitorSettings(slack_webhook_url=SecretStr(url), notify_retry_initial_s=0.05)
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        store = MonitorStore(disk / "monitor.db")
        try:
            store.enqueue([("slack", FIRED.to_json()), ("slack", RESOLVED.to_json())])
            filler = fill(disk)
            outbox = NotificationOutbox(store, {"slack": SlackNotifier(settings)}, settings)

            async def deliver() -> None:
                task = asyncio.ensure_future(outbox.run())
                await asyncio.sleep(1.0)  # many retry intervals with the disk full
                assert len(posts) == 1, f"the alert was posted {len(posts)} times"
                filler.unlink()  # room again: the alert's row goes, and the resolution follows it
                await asyncio.to_thread(wait_until, lambda: len(posts) == 2 and store.outbox_size() == 0, 20,
                                        "the resolution and an empty outbox", lambda: str(posts))
                outbox.stop()
                await task

            asyncio.run(deliver())
            assert len(posts) == 2 and b"Resolved" in posts[1] and store.outbox_size() == 0, posts
        finally:
            store.close()


# --- mail servers and webhooks that trickle, never finish, or speak garbage --------------------------

class ScriptedServer:
    """A loopback TCP server running `script(connection)` for each client, in a thread of its own."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.script = script
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.script(conn)
            except OSError:  # the client hung up: done
                pass

    def close(self) -> None:
        self.sock.close()


def trickle(conn: socket.socket, data: bytes, pause_s: float = 0.2) -> None:
    """Send `data` a byte at a time, each within any per-read timeout."""
    for byte in data:
        conn.sendall(bytes([byte]))
        time.sleep(pause_s)


def send_outcome(send: Callable[[], None], wait_s: float = 30) -> str:
    """'sent', or the NotificationError's text; 'still sending' when it did not return within `wait_s`."""
    outcome: list[str] = []

    def attempt() -> None:
        try:
            send()
            outcome.append("sent")
        except NotificationError as exc:
            outcome.append(f"{'permanent' if exc.permanent else 'temporary'}: {exc}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(wait_s)
    return outcome[0] if outcome else "still sending"


def webhook_notifier(port: int) -> SlackNotifier:
    return SlackNotifier(MonitorSettings(slack_webhook_url=SecretStr(f"http://127.0.0.1:{port}/hook/tok3n"),
                                         notify_timeout_s=1))


def test_a_webhook_that_trickles_its_answer_fails_at_the_notify_deadline() -> None:
    def script(conn: socket.socket) -> None:
        conn.recv(65536)
        trickle(conn, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 1000)

    server = ScriptedServer(script)
    try:
        outcome = send_outcome(lambda: webhook_notifier(server.port).send(FIRED))
    finally:
        server.close()
    assert outcome == ("temporary: the Slack webhook's answer did not finish within FASHION_NOTIFY_TIMEOUT_S (1 s)")


def test_a_webhook_whose_200_answer_never_ends_is_a_delivery() -> None:
    """A 2xx status is Slack's "posted": a body that goes on and on (16 MiB, then silence with the connection
    open) neither holds the outbox nor fills the memory, and sending the alert again would post it twice."""
    def script(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(256):
            conn.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        time.sleep(10)

    server = ScriptedServer(script)
    try:
        assert send_outcome(lambda: webhook_notifier(server.port).send(FIRED)) == "sent"
    finally:
        server.close()


def smtp_server(answers: dict[bytes, bytes], greeting: Callable[[socket.socket], None] | None = None
                ) -> ScriptedServer:
    """An SMTP server speaking just enough: `greeting` (default a 220 line), then per command verb its
    answer from `answers` (default "250 ok"); DATA's content is taken up to its final dot."""
    def script(conn: socket.socket) -> None:
        if greeting is not None:
            greeting(conn)
            return
        conn.sendall(b"220 mail.test ESMTP\r\n")
        lines = conn.makefile("rb")
        while line := lines.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while lines.readline() not in (b".\r\n", b""):
                    pass
                conn.sendall(answers.get(b"DOT", b"250 accepted\r\n"))
                continue
            conn.sendall(answers.get(verb, b"250 ok\r\n"))
            if verb == b"QUIT":
                return

    return ScriptedServer(script)


def email_to(server: ScriptedServer) -> EmailNotifier:
    return EmailNotifier(email_settings(server.port, notify_timeout_s=1))


def test_a_mail_server_that_trickles_its_greeting_fails_at_the_notify_deadline() -> None:
    server = smtp_server({}, greeting=lambda conn: trickle(conn, b"220 " + b"a" * 1000))
    try:
        outcome = send_outcome(lambda: email_to(server).send(FIRED))
    finally:
        server.close()
    assert outcome == "temporary: the email delivery did not finish within FASHION_NOTIFY_TIMEOUT_S (1 s)"


def test_a_mail_servers_garbled_reply_is_retried_not_dropped_as_refused() -> None:
    """A reply line too long for smtplib is garbage, not the server's 5xx refusal: the alert is retried, never
    dropped for good."""
    server = smtp_server({b"MAIL": b"250 " + b"z" * 9000 + b"\r\n"})
    try:
        outcome = send_outcome(lambda: email_to(server).send(FIRED))
    finally:
        server.close()
    assert outcome.startswith("temporary: "), outcome


def test_an_email_accepted_before_a_garbled_quit_is_delivered() -> None:
    """The server took the message, then answers QUIT with garbage: the email was delivered, and a retry
    would send it a second time."""
    server = smtp_server({b"QUIT": b"500 what?\r\n"})
    try:
        assert send_outcome(lambda: email_to(server).send(FIRED)) == "sent"
    finally:
        server.close()


# --- callers' strings --------------------------------------------------------------------------------

def test_megabyte_arguments_get_invalid_argument_quoting_them_cut(tmp_path: Path) -> None:
    monitor = start_monitor(tmp_path, monitor_env(tmp_path, unused_address(), unused_address()))
    try:
        with client_of(monitor.address) as client:
            for call in (lambda: client.alerts(rule="r" * 1_000_000),
                         lambda: client.send_test_alert("c" * 1_000_000)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                details = err.value.details()
                assert "... (1,000,000 characters)" in details and len(details) < 300, details
            assert client.system_health().services
    finally:
        monitor.terminate()
    assert "r" * 100 not in monitor.output()  # nor in the log


# --- the wall clock jumps ----------------------------------------------------------------------------

def test_a_clock_jumping_days_ahead_sends_one_scheduled_report_not_one_per_day_missed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daily report: right after 09:00's, the wall clock jumps 3 days ahead (a resumed virtual machine, NTP
    fixing a wrong clock). One report comes for the time that came due, then the next is tomorrow's."""
    start = datetime(2026, 3, 2, 8, 59, 59, 800_000)
    offset = [timedelta(0)]
    began = time.monotonic()

    class JumpingClock(datetime):
        @classmethod
        def now(cls, tz: object = None) -> JumpingClock:  # type: ignore[override]
            at = start + timedelta(seconds=time.monotonic() - began) + offset[0]
            return cls(at.year, at.month, at.day, at.hour, at.minute, at.second, at.microsecond)

    settings = MonitorSettings(report_cron="0 9 * * *", monitor_state_db=tmp_path / "monitor.db",
                               report_dir=tmp_path / "reports")
    monitor = Monitor.service(settings)
    reports: list[datetime] = []

    async def generate_report(chart_days: int = 0, text_only: bool = False) -> tuple[ReportFiles, Health]:
        reports.append(JumpingClock.now())
        if len(reports) == 1:
            offset[0] = timedelta(days=3)
        return ReportFiles(tmp_path / "report.txt", "REPORT\n", JumpingClock.now()), Health.HEALTHY

    monkeypatch.setattr(monitor, "generate_report", generate_report)
    monkeypatch.setattr(monitor_module, "datetime", JumpingClock)
    monkeypatch.setattr(monitor_module, "REPORT_CLOCK_CHECK_S", 0.05)

    async def run_for(seconds: float) -> None:
        task = asyncio.ensure_future(monitor.run_scheduled_reports())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await monitor.close()

    asyncio.run(run_for(1.5))
    assert [f"{r:%m-%d %H}" for r in reports] == ["03-02 09", "03-05 09"], reports


def test_a_full_report_disk_is_http_507_through_the_gateway_naming_the_folder(tmp_path: Path) -> None:
    """POST /monitor/reports on a full report disk: 507 Insufficient Storage naming the folder and its setting,
    no Retry-After (429 with Retry-After: 1 had clients retry every second against a disk only a person frees)."""
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        reports = disk / "reports"
        monitor = start_monitor(tmp_path, monitor_env(tmp_path, unused_address(), unused_address(),
                                                      FASHION_REPORT_DIR=str(reports)))
        gateway = start_gateway(tmp_path / "gateway", unused_address(), FASHION_MONITOR_ADDRESS=monitor.address)
        try:
            gateway.wait_ready()
            fill(disk)
            answer = httpx.post(f"{gateway.url}/monitor/reports", timeout=60)
        finally:
            gateway.terminate()
            monitor.terminate()
    assert answer.status_code == 507, answer.text
    assert answer.json() == {"error": {"status": 507, "code": "RESOURCE_EXHAUSTED", "message": (
        f"cannot write the report in {reports} (FASHION_REPORT_DIR): No space left on device")}}
    assert "retry-after" not in answer.headers

"""Alert notifications: email over SMTP and Slack incoming webhooks, in the formats of the
monitoring guide (docs/monitoring-and-logging-guide.md: subject "[SEVERITY] title"; Slack JSON with
text, username "Fashion Classifier Bot", icon_emoji), and the outbox delivery that retries a
failing notifier with exponential backoff.

Secrets (SMTP password, webhook URL) come from the environment or a secrets file, are read at each
send (a rotated secret needs no restart), and never leave a notifier: every failure of a send is a
NotificationError whose text has them scrubbed, which is all the outbox logs and stores. The SMTP
password is only sent over TLS (unless smtp_allow_plaintext_auth), and webhooks only over https
(http only to a loopback address, for local relays and tests).

A failure is temporary (retried in order) unless the receiving server refused that one notification
for good (an SMTP 5xx to the message, an HTTP 4xx other than 408 and 429): that one is dropped,
logged as an error, and the notifications queued behind it go out.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import math
import re
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from services.common import metrics
from services.common.config import MonitorSettings
from services.monitor.store import MonitorStore

log = logging.getLogger(__name__)

SLACK_EMOJI = {"INFO": ":information_source:", "WARNING": ":warning:", "ERROR": ":x:", "CRITICAL": ":rotating_light:"}
MAX_ERROR_CHARS = 300
MAX_REPLY_EXCERPT = 120
"""Characters of an HTTP error reply quoted in the error (tags and secrets removed)."""
MAX_REPLY_READ = 64 * 1024
SMTP_PORT, SMTPS_PORT = 587, 465
"""FASHION_SMTP_PORT when unset: STARTTLS or plain, implicit TLS (FASHION_SMTP_SSL)."""
TEMPORARY_HTTP_4XX = (408, 429)
"""Client errors that say "try again later"; every other 4xx refuses the message for good."""


class NotificationError(Exception):
    """A delivery failed; the message is safe to log (secrets removed). `permanent`: the receiving
    server refused this notification for good, retrying cannot help; `retry_after`: seconds the server
    asked to wait before the next attempt (HTTP Retry-After)."""

    def __init__(self, message: str, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


@dataclass(frozen=True)
class Notification:
    """One alert transition to tell people about."""

    rule: str
    title: str
    severity: str
    kind: str
    """"fired", "resolved" or "report" (the scheduled report: title is the subject, message the text)."""
    message: str
    at: float
    started_at: float
    condition: str = ""
    host: str = ""
    attachment: str = ""
    """A file emailed along (the scheduled report's HTML dashboard); Slack gets the text only."""

    @property
    def subject(self) -> str:
        if self.kind == "report":
            return self.title
        if self.kind == "resolved":
            return f"[INFO] Resolved: {self.title}"
        return f"[{self.severity}] {self.title}"

    def body(self) -> str:
        if self.kind == "report":
            return self.message
        lines = [self.title, ""]
        if self.kind == "resolved":
            lines += [f"Status: RESOLVED after {_duration(self.at - self.started_at)}",
                      f"Resolved at: {_local(self.at)}"]
        else:
            lines += [f"Severity: {self.severity}", "Status: FIRING"]
        lines += [f"Since: {_local(self.started_at)}", f"Rule: {self.rule}"
                  + (f" ({self.condition})" if self.condition else ""), "", self.message, "", "--",
                  f"Fashion Classifier monitor on {self.host or socket.gethostname()}"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Notification:
        return cls(**json.loads(text))


class Notifier(Protocol):
    name: str

    @property
    def destination(self) -> str:
        """Where it delivers, safe to show (recipients, a host; never a secret)."""

    def send(self, notification: Notification) -> None:
        """Deliver or raise NotificationError."""


def _secret(value: SecretStr | None, file: Path | None) -> str:
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise NotificationError(f"cannot read secrets file {file}: {exc.strerror}") from None
    return ""


def _scrubbed(exc: BaseException, secrets: list[str]) -> str:
    return _scrub_text(f"{type(exc).__name__}: {exc}", secrets)[:MAX_ERROR_CHARS]


def _scrub_text(text: str, secrets: list[str]) -> str:
    """`text` with every secret replaced by ***, longest first and ignoring case (a relay may change it)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)
    return text


def _url_secrets(url: str) -> list[str]:
    """Every part of a webhook URL that could be quoted back: the URL, its host, path, query, each path
    segment (the token alone), plain and percent-encoded. Segments under 4 characters are no secret,
    and scrubbing them would blank ordinary words."""
    parts = urllib.parse.urlsplit(url)
    pieces = [url, parts.netloc, parts.path, parts.query, parts.fragment]
    pieces += [segment for segment in parts.path.split("/") if len(segment) >= 4]
    pieces += [urllib.parse.unquote(p) for p in pieces] + [urllib.parse.quote(p) for p in pieces]
    return [p for p in set(pieces) if len(p) >= 4]


class Deadline:
    """The whole-delivery deadline (FASHION_NOTIFY_TIMEOUT_S): socket timeouts bound each read, not a
    server that trickles a byte at a time, so when the deadline passes the delivery's sockets are shut
    down, which ends any read or write blocked on them. `watch` registers a getter of the current
    socket (STARTTLS replaces it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[Callable[[], socket.socket | None]] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def watch(self, current_socket: Callable[[], socket.socket | None]) -> None:
        with self._lock:
            self._sockets.append(current_socket)
            expired = self.expired
        if expired:
            _shut(current_socket())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            getters = list(self._sockets)
        for getter in getters:
            _shut(getter())

    def failure(self, what: str) -> NotificationError:
        return NotificationError(f"{what} did not finish within FASHION_NOTIFY_TIMEOUT_S ({self.seconds:g} s)")


def _shut(sock: socket.socket | None) -> None:
    """End every blocked read and write on `sock` (the plain socket's shutdown, also under TLS: the
    SSL object stays to the thread using it)."""
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP whose sockets a Deadline watches."""

    def __init__(self, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        deadline.watch(lambda: getattr(self, "sock", None))


class _SMTPS(smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL whose sockets a Deadline watches."""

    def __init__(self, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        deadline.watch(lambda: getattr(self, "sock", None))


class EmailNotifier:
    """Sends each notification as a plain-text email (smtplib), with STARTTLS or implicit TLS,
    logging in when a user is configured."""

    name = "email"

    def __init__(self, settings: MonitorSettings) -> None:
        if not settings.smtp_to:
            raise ValueError("FASHION_SMTP_HOST is set but FASHION_SMTP_TO has no recipient")
        if settings.smtp_user and not (settings.smtp_starttls or settings.smtp_ssl or
                                       settings.smtp_allow_plaintext_auth):
            raise ValueError("FASHION_SMTP_USER is set but the connection has no TLS, so the password would cross "
                             "in clear text: set FASHION_SMTP_STARTTLS=true or FASHION_SMTP_SSL=true (or "
                             "FASHION_SMTP_ALLOW_PLAINTEXT_AUTH=true on a network you trust)")
        if not settings.smtp_user and (settings.smtp_password or settings.smtp_password_file):
            # Without a user there is no login: the password would be ignored and every send refused.
            raise ValueError("FASHION_SMTP_PASSWORD (or FASHION_SMTP_PASSWORD_FILE) is set but FASHION_SMTP_USER "
                             "is not: set the user to log in with it (or remove the password for a server "
                             "without login)")
        self.settings = settings

    @property
    def destination(self) -> str:
        return ", ".join(self.settings.smtp_to)

    @property
    def port(self) -> int:
        """FASHION_SMTP_PORT, else 465 with implicit TLS and 587 without."""
        s = self.settings
        if s.smtp_port is not None:
            return s.smtp_port
        return SMTPS_PORT if s.smtp_ssl else SMTP_PORT

    def send(self, notification: Notification) -> None:
        password = ""
        try:
            password = _secret(self.settings.smtp_password, self.settings.smtp_password_file) \
                if self.settings.smtp_user else ""
            self._send(notification, password)
        except NotificationError:
            raise
        except Exception as exc:  # whatever it is, its text may quote the password: scrub it
            raise NotificationError(_scrubbed(exc, [password])) from None

    def _send(self, notification: Notification, password: str) -> None:
        s = self.settings
        msg = EmailMessage()
        msg["From"] = s.smtp_from
        msg["To"] = ", ".join(s.smtp_to)
        msg["Subject"] = notification.subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=s.smtp_from.rpartition("@")[2] or None)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no out-of-office replies to alerts
        msg.set_content(notification.body())
        if notification.attachment:
            try:
                page = Path(notification.attachment).read_bytes()
                msg.add_attachment(page, maintype="text", subtype="html", filename=Path(notification.attachment).name)
            except OSError as exc:  # the report folder was cleaned up: send the text anyway
                log.warning("Not attaching %s: %s", notification.attachment, exc.strerror)
        deadline = Deadline(s.notify_timeout_s)
        smtp: smtplib.SMTP | None = None
        try:
            with deadline:
                context = ssl.create_default_context(cafile=str(s.smtp_ca_file) if s.smtp_ca_file else None)
                # Made unconnected, so that the deadline watches the socket from the server's greeting on.
                smtp = (_SMTPS(deadline, timeout=s.notify_timeout_s, context=context) if s.smtp_ssl
                        else _SMTP(deadline, timeout=s.notify_timeout_s))
                smtp._host = s.smtp_host  # type: ignore[attr-defined]  # the TLS server name, as connecting by the constructor sets it
                code, reply = smtp.connect(s.smtp_host, self.port)
                if code != 220:
                    raise smtplib.SMTPConnectError(code, reply)
                if s.smtp_starttls and not s.smtp_ssl:
                    smtp.starttls(context=context)
                if s.smtp_user:
                    smtp.ehlo_or_helo_if_needed()
                    if not smtp.has_extn("auth") and not (s.smtp_starttls or s.smtp_ssl):
                        # Servers offer AUTH only over TLS: say what to change, not just "not supported".
                        raise NotificationError("the SMTP server offers no login without TLS; set "
                                                "FASHION_SMTP_STARTTLS=true (or FASHION_SMTP_SSL=true)")
                    smtp.login(s.smtp_user, password)
                try:
                    refused = smtp.send_message(msg)
                except smtplib.SMTPException as exc:  # the server's answer to this message
                    if deadline.expired:
                        raise deadline.failure("the email delivery") from None
                    raise NotificationError(_scrubbed(exc, [password]), permanent=_refused_for_good(exc)) from None
                # Accepted: what the server says to QUIT (garbage, a hang) cannot undo the delivery, and
                # a retry would send the email twice.
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    pass
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            if deadline.expired:
                raise deadline.failure("the email delivery") from None
            raise NotificationError(_scrubbed(exc, [password])) from None
        finally:
            if smtp is not None:
                smtp.close()
        if refused:  # the others got it: delivered, but a recipient is wrong and someone must know
            log.warning("Email %r was not delivered to %s (sent to the other recipients)", notification.subject,
                        "; ".join(f"{rcpt} ({code} {reply.decode(errors='replace')})"
                                  for rcpt, (code, reply) in refused.items()))


def _refused_for_good(exc: smtplib.SMTPException) -> bool:
    """Whether an error of send_message is the server's permanent (5xx) refusal of the message: at
    MAIL FROM (e.g. 552 too large), of every recipient, or at DATA. Connecting and logging in are not
    judged here: their failures hold for every message and are retried (a password file may be fixed)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(_server_refused(code, reply) for code, reply in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):  # SMTPSenderRefused, SMTPDataError
        return _server_refused(exc.smtp_code, exc.smtp_error)
    return False


def _server_refused(code: int, reply: bytes | str) -> bool:
    """A 5xx the server sent. smtplib makes up a 500 ("Line too long.", a str) for a reply it could not
    read: garbage from the server, or a cut connection, no refusal; codes past 599 are garbage too."""
    return 500 <= code < 600 and isinstance(reply, bytes)


def webhook_url_problem(url: str) -> str | None:
    """Why a webhook URL is refused (https only; http only to a loopback address), None when usable.
    The answer never quotes the URL: it is a secret."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname:
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return None
        except ValueError:
            if parts.hostname == "localhost":
                return None
        return "the Slack webhook URL must start with https:// (http:// is accepted only for a loopback address)"
    return "the Slack webhook URL must start with https:// and name its host"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect of a POST with a body-less GET, whose 200 would pass for a delivery:
    refused, the 3xx reaches SlackNotifier.send as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def slack_escaped(text: str) -> str:
    """`text` as Slack's message formatting wants it: &, < and > escaped, so no text of ours can
    become a mention (<!channel>) or a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_code(text: str) -> str:
    """`text` escaped for the inside of a ``` block: no two backticks stay adjacent (a zero-width
    space between them), so the text cannot close the block early."""
    text = re.sub("`(?=`)", "`\u200b", slack_escaped(text))
    return text + "\u200b" if text.endswith("`") else text


class SlackNotifier:
    """Posts the monitoring guide's payload to a Slack incoming webhook (urllib; any 2xx is success,
    a redirect is not followed and fails the send)."""

    name = "slack"

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        try:
            self._url()  # a wrong URL stops the start, with the reason (never the URL)
        except NotificationError as exc:
            raise ValueError(str(exc)) from None

    @property
    def destination(self) -> str:
        """The webhook's host (its path is the secret)."""
        try:
            return urllib.parse.urlsplit(self._url()).hostname or ""
        except NotificationError:
            return ""

    def _url(self) -> str:
        """The webhook URL as the secret holds it now. Raises NotificationError when it is unusable."""
        url = _secret(self.settings.slack_webhook_url, self.settings.slack_webhook_url_file)
        problem = webhook_url_problem(url)
        if problem is not None:
            raise NotificationError(problem)
        return url

    def payload(self, notification: Notification) -> dict[str, str]:
        subject = slack_escaped(notification.subject)
        if notification.kind == "report":
            text = f":bar_chart: *{subject}*\n```\n{slack_code(notification.message)}```"
            return {"text": text, "username": self.settings.slack_username,
                    "icon_emoji": self.settings.slack_icon_emoji}
        if notification.kind == "resolved":
            head = f":white_check_mark: *{subject}*"
        else:
            head = f"{SLACK_EMOJI.get(notification.severity, ':warning:')} *{subject}*"
        return {
            "text": f"{head}\n{slack_escaped(notification.message)}",
            "username": self.settings.slack_username,
            "icon_emoji": self.settings.slack_icon_emoji,
        }

    def send(self, notification: Notification) -> None:
        url = self._url()
        deadline = Deadline(self.settings.notify_timeout_s)
        opener = urllib.request.build_opener(_RefuseRedirects, _WatchedHTTPHandler(deadline),
                                             _WatchedHTTPSHandler(deadline))
        with deadline:  # the error reply's excerpt is read under it too
            try:
                request = urllib.request.Request(
                    url, data=json.dumps(self.payload(notification)).encode(), method="POST",
                    headers={"Content-Type": "application/json; charset=utf-8"})
                with opener.open(request, timeout=self.settings.notify_timeout_s) as resp:
                    # A 2xx status is the delivery: the reply's body (Slack's "ok") is read only in part,
                    # and a body that never ends or breaks off changes nothing.
                    try:
                        resp.read(MAX_REPLY_READ)
                    except Exception:
                        pass
            except urllib.error.HTTPError as exc:
                with exc:  # closes the reply
                    raise _http_failure(exc, url) from None
            except Exception as exc:  # URLError, timeouts, malformed URLs: all become a retryable failure
                if deadline.expired:
                    raise deadline.failure("the Slack webhook's answer") from None
                raise NotificationError(_scrubbed(exc, [url, *urllib.parse.urlsplit(url)[1:],
                                                        *_url_secrets(url)])) from None


class _WatchedConnections(urllib.request.AbstractHTTPHandler):
    """urllib's HTTP(S) handler whose connections' sockets a Deadline watches."""

    def __init__(self, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._deadline = deadline

    def do_open(self, http_class, req, **http_conn_args):  # type: ignore[no-untyped-def,override]
        def connection(*args: Any, **kwargs: Any) -> Any:
            conn = http_class(*args, **kwargs)
            self._deadline.watch(lambda: conn.sock)
            return conn
        return super().do_open(connection, req, **http_conn_args)


class _WatchedHTTPHandler(_WatchedConnections, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_WatchedConnections, urllib.request.HTTPSHandler):
    pass


def _http_failure(exc: urllib.error.HTTPError, url: str) -> NotificationError:
    """The error for a webhook's non-2xx answer: its status, a short excerpt of its reply with every
    part of the URL removed (a relay's 404 page may quote the path, which holds the token), whether it
    is permanent (4xx but 408 and 429), and the Retry-After it asked for."""
    code = exc.code
    if 300 <= code < 400:
        return NotificationError(f"Slack webhook answered HTTP {code}, a redirect: not followed, the message was "
                                 "not posted (check the webhook URL and any proxy in between)")
    try:
        reply = exc.read(MAX_REPLY_READ).decode(errors="replace")
    except Exception:  # the reply broke off: the status says enough
        reply = ""
    secrets = _url_secrets(url)
    if len(reply) >= MAX_REPLY_READ:  # cut: its end may hold the start of a secret, which no scrub would find
        reply = reply[:len(reply) - max((len(s) for s in secrets), default=0)]
    excerpt = " ".join(re.sub(r"<[^>]*>", " ", _scrub_text(reply, secrets)).split())[:MAX_REPLY_EXCERPT]
    permanent = 400 <= code < 500 and code not in TEMPORARY_HTTP_4XX
    text = f"Slack webhook answered HTTP {code}" + (f": {excerpt}" if excerpt else "")
    retry_after = None if permanent else _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
    return NotificationError(text[:MAX_ERROR_CHARS], permanent=permanent, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    """Seconds of an HTTP Retry-After header (delay-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def build_notifiers(settings: MonitorSettings) -> dict[str, Notifier]:
    """The configured notifiers: email when FASHION_SMTP_HOST is set, Slack when a webhook URL is."""
    notifiers: dict[str, Notifier] = {}
    if settings.smtp_host:
        notifiers["email"] = EmailNotifier(settings)
    if settings.slack_webhook_url is not None or settings.slack_webhook_url_file is not None:
        notifiers["slack"] = SlackNotifier(settings)
    return notifiers


class NotificationOutbox:
    """Delivers queued notifications, each notifier's strictly in order. A temporary failure is logged
    and retried later with exponential backoff (or the server's Retry-After); a permanent one drops
    that notification with an error, letting the next go. It never raises, so the monitor keeps running."""

    def __init__(self, store: MonitorStore, notifiers: dict[str, Notifier], settings: MonitorSettings) -> None:
        self.store = store
        self.notifiers = notifiers
        self.settings = settings
        self._wake = asyncio.Event()
        self._stopping = threading.Event()  # read by deliver_due in its worker thread
        self._unrecorded: set[int] = set()
        """Outbox rows sent (or dropped) whose removal the store refused (its disk full): never sent
        again by this process, removed once the store takes writes again."""
        self._held_until: dict[int, float] = {}
        """Retry times of failed rows whose new time the store refused: the backoff holds all the same."""

    def wake(self) -> None:
        """Deliver now (new notifications were queued)."""
        self._wake.set()

    def stop(self) -> None:
        """Start no new delivery: run() returns once the one in flight, if any, is sent and recorded
        (so the store can then be closed without the notification going out again after a restart)."""
        self._stopping.set()
        self._wake.set()

    def deliver_due(self) -> int:
        """Attempt every notification that is due; returns how many were sent. Blocking."""
        sent = 0
        progress = True
        for item_id in list(self._unrecorded):
            self._record_done(item_id)
        while progress and not self._stopping.is_set():
            progress = False
            now = time.time()
            for item in self.store.outbox_heads():
                if self._stopping.is_set():
                    break
                if item.id in self._unrecorded or max(item.next_attempt_at, self._held_until.get(item.id, 0)) > now:
                    continue
                notification = Notification.from_json(item.notification)
                notifier = self.notifiers.get(item.notifier)
                if notifier is None:
                    log.warning("Dropping %s notification %r: that notifier is no longer configured",
                                item.notifier, notification.subject)
                    self._record_done(item.id)
                    continue
                try:
                    notifier.send(notification)
                except Exception as exc:
                    # A dropped head lets the notifier's next notification go in this same pass.
                    progress |= self._failed(item.id, item.attempts + 1, item.created_at, notifier.name,
                                             notification, exc)
                    continue
                metrics.MONITOR_NOTIFICATIONS.labels(notifier.name, "sent").inc()
                log.info("Sent %s notification %r", notifier.name, notification.subject)
                sent += 1
                progress = self._record_done(item.id) or progress
        metrics.MONITOR_PENDING_NOTIFICATIONS.set(max(0, self.store.outbox_size() - len(self._unrecorded)))
        return sent

    def _record_done(self, item_id: int) -> bool:
        """Remove a sent or dropped notification from the outbox; whether the store took it. When it does
        not (a full disk), the row is remembered as done, so it is not sent again while the disk is full."""
        try:
            self.store.outbox_done(item_id)
        except sqlite3.Error as exc:
            if item_id not in self._unrecorded:
                log.error("A notification sent (or given up) could not be removed from the outbox in %s "
                          "(FASHION_MONITOR_STATE_DB): %s; it is not sent again, and removed once the file "
                          "takes writes (if the Monitor is restarted before, it is sent once more)",
                          self.store.path, exc)
            self._unrecorded.add(item_id)
            return False
        self._unrecorded.discard(item_id)
        self._held_until.pop(item_id, None)
        return True

    def next_due(self) -> float | None:
        """When the next queued notification is due (its backoff included), None when none waits."""
        heads = [h for h in self.store.outbox_heads() if h.id not in self._unrecorded]
        if self._unrecorded:  # try their removal again soon
            heads_due = [time.time() + self.settings.notify_retry_initial_s]
        else:
            heads_due = []
        return min([max(h.next_attempt_at, self._held_until.get(h.id, 0)) for h in heads] + heads_due, default=None)

    def _failed(self, item_id: int, attempts: int, created_at: float, notifier: str,
                notification: Notification, exc: Exception) -> bool:
        """Record a failed attempt: dropped (returns True) when refused for good or too old, else
        scheduled for a retry."""
        # Notifiers scrub their own errors; anything else is a bug whose text might quote a secret.
        error = str(exc) if isinstance(exc, NotificationError) else f"{type(exc).__name__} (details not shown)"
        now = time.time()
        if isinstance(exc, NotificationError) and exc.permanent:
            self._drop(item_id, notifier, notification, f"after attempt {attempts}: refused for good, retrying "
                       f"cannot help ({error}); the notifications queued after it go out")
            return True
        if now - created_at > self.settings.notify_give_up_h * 3600:
            self._drop(item_id, notifier, notification,
                       f"after {attempts} failed attempts over {(now - created_at) / 3600:.1f} h: {error}")
            return True
        delay = min(self.settings.notify_retry_initial_s * 2 ** (attempts - 1), self.settings.notify_retry_max_s)
        asked = ""
        if isinstance(exc, NotificationError) and exc.retry_after is not None:
            delay, asked = min(exc.retry_after, self.settings.notify_retry_max_s), " (the server's Retry-After)"
        log.warning("%s notification %r failed (attempt %d): %s; retrying in %.1f s%s",
                    notifier, notification.subject, attempts, error, delay, asked)
        metrics.MONITOR_NOTIFICATIONS.labels(notifier, "failed").inc()
        try:
            self.store.outbox_retry(item_id, now + delay, error)
        except sqlite3.Error as exc:  # a full disk: the backoff is kept here instead
            log.warning("The next attempt of %s notification %r could not be recorded in %s: %s", notifier,
                        notification.subject, self.store.path, exc)
            self._held_until[item_id] = now + delay
        else:
            self._held_until.pop(item_id, None)
        return False

    def _drop(self, item_id: int, notifier: str, notification: Notification, why: str) -> None:
        """Give a notification up: an error in the log (and monitor_errors.log), the dropped counter."""
        log.error("Dropping %s notification %r %s", notifier, notification.subject, why)
        self._record_done(item_id)
        metrics.MONITOR_NOTIFICATIONS.labels(notifier, "dropped").inc()

    async def run(self) -> None:
        """Deliver until stop() (or cancelled): whenever woken, and when the next retry is due."""
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await asyncio.to_thread(self.deliver_due)
                next_due = await asyncio.to_thread(self.next_due)
            except Exception:  # e.g. the disk is full: keep the loop alive, try again shortly
                log.exception("Notification delivery failed unexpectedly")
                next_due = time.time() + self.settings.notify_retry_initial_s
            wait = 60.0 if next_due is None else max(0.05, min(60.0, next_due - time.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
                pass


def _local(ts: float) -> str:
    """The local time with its zone: the people reading an alert may sit in another one."""
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"

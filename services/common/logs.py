"""Logging for every service, in the layout of the users' monitoring guide.

`logs/<name>.log` receives everything at the configured level and above, `logs/<name>_errors.log`
only ERROR and CRITICAL; both rotate at 10 MB keeping 10 backups; lines also go to stdout.
The Inference service uses the name "api" (logs/api.log, logs/api_errors.log). Containers log to
stdout only (FASHION_LOG_FILES=false), and FASHION_LOG_FORMAT=json writes one JSON object per line
(UTC time with milliseconds, level, logger, message, trace_id, span_id, service) for log collectors.

Records are handed to a background thread so that writing files never stalls the event loop;
the trace id is captured in the calling thread, where the span is. The writer formats each
record once for all destinations and flushes once per burst rather than per line, and
per-request access lines skip the LogRecord machinery (`log_line`): an access-log line per
request stays cheap at thousands of requests per second.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import logging.handlers
import os
import queue
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path

from opentelemetry import trace

from fashion.client.text import printable
from services.common.config import CommonSettings

LINE_FORMAT = "[%(asctime)s] %(levelname)s %(name)s [trace_id=%(trace_id)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_writer: LogWriter | None = None

CALL_TRACE_ID: ContextVar[str] = ContextVar("call_trace_id", default="-")
"""The trace id of the call being handled when OpenTelemetry is not tracing: the caller's W3C
trace id or a fresh one (set by the gRPC RequestObserver), so log lines always carry one."""


def current_trace_id() -> str:
    """The OpenTelemetry span's trace id, else the call's (CALL_TRACE_ID), "-" outside any call."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else CALL_TRACE_ID.get()


def current_span_id() -> str:
    """The OpenTelemetry span's id, "-" when no span is being recorded."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else "-"


class TraceIdFilter(logging.Filter):
    """Stamps each record with the current trace and span ids (see current_trace_id, current_span_id),
    in the calling thread, where the span is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = current_trace_id()
        if not hasattr(record, "span_id"):
            record.span_id = current_span_id()
        return True


def _shown(arg: object) -> object:
    """A log record's argument as it is, or as printable text when its text holds control characters."""
    if arg is None or isinstance(arg, int | float):
        return arg
    text = str(arg)
    return arg if text.isprintable() else printable(text)


class LineFormatter(logging.Formatter):
    """The text lines (LINE_FORMAT). A record's arguments (names, paths, errors quoting them, what callers
    sent) have their control characters escaped, so that none can end the line and forge the next; the
    message templates and tracebacks are ours and keep theirs."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_shown(arg) for arg in record.args)
        return super().format(record)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601 with milliseconds), level, logger, message,
    trace_id and span_id (null outside a call), service, and the exception when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        return json_line(record.created, record.levelname, record.name, record.getMessage(),
                         getattr(record, "trace_id", "-"), getattr(record, "span_id", "-"), self.service,
                         record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None))


def json_line(created: float, level: str, logger: str, message: str, trace_id: str, span_id: str, service: str,
              exception: str | None = None) -> str:
    fields: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z",
        "level": level, "logger": logger, "message": message,
        "trace_id": None if trace_id == "-" else trace_id, "span_id": None if span_id == "-" else span_id,
        "service": service,
    }
    if exception:
        fields["exception"] = exception
    return json.dumps(fields, ensure_ascii=False)


class _DeferredQueueHandler(logging.handlers.QueueHandler):
    """Queues the record itself; formatting happens in the listener thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def _say_on_stderr(message: str) -> None:
    sys.stderr.write(f"{time.strftime(DATE_FORMAT)} ERROR {message}\n")
    sys.stderr.flush()


class RotatingFile:
    """Appends lines to `path`, rotating like logging.handlers.RotatingFileHandler (path.1 ..
    path.N, N = backups) when the next line would pass `max_bytes`. Lines are buffered and written
    with one system call per flush, where the stdlib handler's per-line stat, tell, double
    formatting and flush made an access-log line expensive next to a classification.

    A flush that cannot be written (a full disk, an I/O error) never fails the caller: the lines of that
    flush are lost, none written in part (the file is cut back to its last whole line), the first failure
    is said once (`report`, stderr by default) and, once a flush is written again, a warning says how many
    lines were lost and why."""

    def __init__(self, path: Path, max_bytes: int, backups: int, level: int,
                 report: Callable[[str], None] = _say_on_stderr) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.level = level
        self.report = report
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.failure: OSError | None = None
        """Why the last flush was not written; None while the file is written."""
        self.lost = 0
        """Lines lost since the failure."""
        self.rotation_failure: OSError | None = None
        """Why the last rotation failed; None once one succeeds."""

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        if self.max_bytes > 0 and self._size + self._pending_size > 0 and \
                self._size + self._pending_size + len(data) > self.max_bytes:
            self.flush()
            try:
                self._rotate()
            except OSError as exc:  # e.g. a folder made read-only: the line goes on in the file as it is
                if self.rotation_failure is None:
                    self.report(f"cannot rotate the log file {self.path}: {exc.strerror or exc}; it grows past "
                                f"{self.max_bytes} bytes until it can be rotated")
                self.rotation_failure = exc
            else:
                self.rotation_failure = None
        self._pending.append(data)
        self._pending_size += len(data)

    def _rotate(self) -> None:
        try:
            os.close(self._fd)
            if self.backups > 0:
                for i in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink(missing_ok=True)
        finally:  # the file stays open (the same one when the rotation failed), as lines keep coming
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size

    def flush(self) -> None:
        if not self._pending:
            return
        data, lines = b"".join(self._pending), len(self._pending)
        self._pending, self._pending_size = [], 0
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            if written:  # no half line left for the next to continue
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            if self.failure is None:
                self.report(f"cannot write the log file {self.path}: {exc.strerror or exc}; its lines are lost "
                            "until it can be written again")
            self.failure = exc
            self.lost += lines
            return
        self._size += len(data)
        if self.failure is not None:
            failure, lost = self.failure, self.lost
            self.failure, self.lost = None, 0
            logging.getLogger(__name__).warning("%d line(s) of %s were lost while it could not be written (%s)",
                                                lost, self.path, failure.strerror or failure)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self._fd)


class _Stdout:
    """stdout as a sink, until it is gone (its reader went away: `fashion serve ... | head`; closed or none at
    start): then it is dropped quietly, the log files going on, instead of a traceback per line."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.gone = False

    def write(self, line: str) -> None:
        if not self.gone:
            try:
                sys.stdout.write(line)
            except (OSError, ValueError, AttributeError):  # EPIPE, a closed file, sys.stdout None
                self.gone = True

    def flush(self) -> None:
        if not self.gone:
            try:
                sys.stdout.flush()
            except (OSError, ValueError, AttributeError):
                self.gone = True

    def close(self) -> None:
        self.flush()


FORWARD_FD_ENV = "_FASHION_LOG_FD"
"""Set by a parent process that writes its children's logs (services.inference.processes): the child's
end of a socket to send its formatted lines to, instead of writing files and stdout itself."""
_FRAME = struct.Struct("!IH")  # a forwarded line: its length in bytes and its level, then the UTF-8 line


class ForwardSink:
    """A child process's only sink: its formatted lines go, each whole with its level, over a socket
    to the parent, whose one LogWriter writes logs/<name>.log: one writer, no interleaved lines, the
    rotation as with one process (`forward_lines` is the parent's end)."""

    level = logging.DEBUG

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def send(self, level: int, line: str) -> None:
        data = line.encode("utf-8", "replace")
        self._buffer += _FRAME.pack(len(data), level)
        self._buffer += data

    def write(self, line: str) -> None:
        self.send(logging.INFO, line)

    def flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            try:
                self._sock.sendall(data)
            except OSError:
                pass  # the parent is gone: nothing left to write to

    def close(self) -> None:
        self.flush()
        self._sock.close()


def forward_lines(sock: socket.socket) -> None:
    """The parent's end of a child's ForwardSink: put each line the child sends into this process's
    LogWriter queue until the child closes the socket (it exited). Runs in a thread of its own."""
    buffer = b""
    with sock:
        while chunk := sock.recv(1 << 16):
            buffer += chunk
            offset = 0
            while len(buffer) - offset >= _FRAME.size:
                size, level = _FRAME.unpack_from(buffer, offset)
                end = offset + _FRAME.size + size
                if end > len(buffer):
                    break
                line = buffer[offset + _FRAME.size:end].decode("utf-8", "replace")
                writer = _writer
                if writer is not None:
                    writer.queue.put((level, line))
                else:
                    sys.stdout.write(line)
                offset = end
            buffer = buffer[offset:]


WRITE_INTERVAL_S = 0.05  # how long lines may wait in the queue: the writer wakes at most this often


class LogWriter:
    """The background thread that writes queued lines to the sinks, flushing after each burst,
    at most every WRITE_INTERVAL_S.

    The queue carries LogRecords (from the logging module) and (level, line) pairs (the
    preformatted per-request lines of `log_line`)."""

    _STOP = object()

    def __init__(self, sinks: list[RotatingFile | _Stdout | ForwardSink], formatter: logging.Formatter,
                 service: str | None = None) -> None:
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.sinks = sinks
        self.formatter = formatter
        self.service = service
        """The service named in JSON lines; None: text lines."""
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            while True:
                if item is self._STOP:
                    self._flush()
                    return
                try:
                    self._write(item)
                except Exception:  # a log line must never kill the writer
                    traceback.print_exc(file=sys.stderr)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            self._flush()
            # Let lines gather: a wake-up per line costs the event loop a GIL hand-off each time.
            time.sleep(WRITE_INTERVAL_S)

    def _write(self, item: object) -> None:
        if isinstance(item, logging.LogRecord):
            level, line = item.levelno, self.formatter.format(item) + "\n"
        else:
            level, line = item  # type: ignore[misc]
        for sink in self.sinks:
            if isinstance(sink, ForwardSink):
                sink.send(level, line)
            elif level >= sink.level:
                sink.write(line)

    def _flush(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except OSError:
                pass

    def stop(self) -> None:
        self.queue.put(self._STOP)
        self._thread.join(timeout=10)
        for sink in self.sinks:
            sink.close()


class _SecondClock:
    """The log timestamp, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second, self._text = now, time.strftime(DATE_FORMAT, time.localtime(now))
        return self._text


_clock = _SecondClock()


def log_line(logger: logging.Logger, level: int, message: str) -> None:
    """Log `message` as `logger` would, in the same line format, but without building a
    LogRecord: the per-request access line's fast path. Falls back to the logger when the
    service logs are not set up."""
    writer = _writer
    if writer is None:
        logger.log(level, message)
        return
    if not logger.isEnabledFor(level):
        return
    if not message.isprintable():  # what callers sent (paths, peers) never ends the line
        message = printable(message)
    if writer.service is not None:
        writer.queue.put((level, json_line(time.time(), logging.getLevelName(level), logger.name, message,
                                           current_trace_id(), current_span_id(), writer.service) + "\n"))
        return
    writer.queue.put((level, f"[{_clock()}] {logging.getLevelName(level)} {logger.name} "
                             f"[trace_id={current_trace_id()}] {message}\n"))


def log_folder_problem(settings: CommonSettings) -> str | None:
    """Why this process could not write its log files in FASHION_LOG_DIR (a folder it may not make or write
    in, a read-only filesystem, a file in the way); None when it can, or when it writes none. Nothing is made:
    a process refused for another reason leaves no folder behind. A full disk is no reason (the service
    serves, and says what its logs lost: RotatingFile)."""
    if not settings.log_files or os.environ.get(FORWARD_FD_ENV):
        return None
    folder = Path(settings.log_dir)
    existing = folder
    while not existing.exists() and existing != existing.parent:  # the folder, or where it would be made
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if existing == folder:
            with tempfile.TemporaryFile(dir=folder):  # a real write: read-only filesystems, ACLs
                pass
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return None
        return f"cannot write log files in {folder} (FASHION_LOG_DIR): {exc.strerror or exc}"
    return None


def setup_logging(settings: CommonSettings, name: str, service: str = "") -> Path:
    """Route the root logger to logs/<name>.log, logs/<name>_errors.log (unless FASHION_LOG_FILES is off)
    and stdout, as text lines or (FASHION_LOG_FORMAT=json) JSON lines naming `service` (default: name).

    In a child process whose parent writes the logs (FORWARD_FD_ENV set), lines go to the parent only.

    Returns the log folder. Calling it again replaces the previous set-up.
    """
    global _writer
    shutdown_logging()
    # The logging HOWTO's optimizations: no caller lookup (a stack walk per record), no thread or
    # process names; the line format uses none of them.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    log_dir = Path(settings.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[RotatingFile | _Stdout | ForwardSink] = []
    forward_fd = os.environ.get(FORWARD_FD_ENV)
    if forward_fd:  # a child of a parent that writes the files (and stdout)
        sinks.append(ForwardSink(socket.socket(fileno=int(forward_fd))))
    elif settings.log_files:
        sinks += [
            RotatingFile(log_dir / f"{name}.log", settings.log_max_bytes, settings.log_backup_count, logging.DEBUG),
            RotatingFile(log_dir / f"{name}_errors.log", settings.log_max_bytes, settings.log_backup_count,
                         logging.ERROR),
        ]
    if not forward_fd and (settings.log_stdout or not sinks):
        sinks.append(_Stdout(logging.DEBUG))
    if settings.log_format == "json":
        _writer = LogWriter(sinks, JsonLineFormatter(service or name), service or name)
    else:
        _writer = LogWriter(sinks, LineFormatter(LINE_FORMAT, DATE_FORMAT))
    front = _DeferredQueueHandler(_writer.queue)  # type: ignore[arg-type]
    front.addFilter(TraceIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(front)
    root.setLevel(settings.log_level)
    return log_dir


def file_logger(path: Path, name: str, settings: CommonSettings, fmt: str = "[%(asctime)s] %(message)s",
                also_stdout: bool = False) -> logging.Logger:
    """A logger writing only to `path` (for per-run logs such as logs/batch_<ts>.log).

    It does not propagate to the service logs; close it with close_file_logger().
    """
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter(fmt, DATE_FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.addHandler(_rotating(path, settings, logging.INFO, formatter))
    if also_stdout:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    return logger


def close_file_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def shutdown_logging() -> None:
    """Write what is queued and stop the background writer (also run at exit)."""
    global _writer
    if _writer is not None:
        writer, _writer = _writer, None
        writer.stop()


class RunLogHandler(logging.Handler):
    """A per-run log file (logs/batch_<timestamp>.log), each line written as it is logged: a disk that
    fills up never fails the run whose log it is; the service's logs say what was lost (RotatingFile)."""

    def __init__(self, path: Path, settings: CommonSettings, level: int) -> None:
        super().__init__(level)
        self.file = RotatingFile(path, settings.log_max_bytes, settings.log_backup_count, level,
                                 report=lambda message: logging.getLogger(__name__).error("%s", message))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.file.write(line)
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # said when it failed to write; the descriptor is closed either way
        finally:
            super().close()


def _rotating(path: Path, settings: CommonSettings, level: int, formatter: logging.Formatter) -> RunLogHandler:
    handler = RunLogHandler(path, settings, level)
    handler.setFormatter(formatter)
    return handler


atexit.register(shutdown_logging)

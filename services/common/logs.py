"""Logging for every service, in the layout of the users' monitoring guide.

`logs/<name>.log` receives everything at the configured level and above, `logs/<name>_errors.log`
only ERROR and CRITICAL; both rotate at 10 MB keeping 10 backups; lines also go to stdout.
The Inference service uses the name "api" (logs/api.log, logs/api_errors.log).

Records are handed to a background thread so that writing files never stalls the event loop;
the trace id is captured in the calling thread, where the span is. The writer formats each
record once for all destinations and flushes once per burst of records rather than per line:
an access-log line per request stays cheap at thousands of requests per second.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
from pathlib import Path

from opentelemetry import trace

from services.common.config import CommonSettings

LINE_FORMAT = "[%(asctime)s] %(levelname)s %(name)s [trace_id=%(trace_id)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_writer: LogWriter | None = None


class TraceIdFilter(logging.Filter):
    """Stamps each record with the current trace id ("-" outside a trace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            ctx = trace.get_current_span().get_span_context()
            record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        return True


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


class _OnceFormatter(logging.Formatter):
    """Formats a record once; every handler sharing this formatter reuses the line (the rotating
    handlers format twice per record otherwise: once to decide on rollover, once to write)."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get("_line")
        if line is None:
            line = record.__dict__["_line"] = super().format(record)
        return line


class _BurstFlushing:
    """Mixin: emit() writes without flushing; the writer thread flushes after each burst."""

    def flush(self) -> None:  # called by StreamHandler.emit for every record
        pass

    def flush_now(self) -> None:
        super().flush()  # type: ignore[misc]


class _RotatingFile(_BurstFlushing, logging.handlers.RotatingFileHandler):
    pass


class _Stream(_BurstFlushing, logging.StreamHandler):  # type: ignore[type-arg]
    pass


class LogWriter:
    """The background thread that writes queued records to the handlers."""

    _STOP = object()

    def __init__(self, handlers: list[logging.Handler]) -> None:
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.handlers = handlers
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            while True:
                if item is self._STOP:
                    self._flush()
                    return
                self._handle(item)  # type: ignore[arg-type]
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            self._flush()

    def _handle(self, record: logging.LogRecord) -> None:
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)

    def _flush(self) -> None:
        for handler in self.handlers:
            if isinstance(handler, _BurstFlushing):
                handler.flush_now()

    def stop(self) -> None:
        self.queue.put(self._STOP)
        self._thread.join(timeout=10)
        for handler in self.handlers:
            handler.close()


def setup_logging(settings: CommonSettings, name: str) -> Path:
    """Route the root logger to logs/<name>.log, logs/<name>_errors.log and stdout.

    Returns the log folder. Calling it again replaces the previous set-up.
    """
    global _writer
    shutdown_logging()
    log_dir = Path(settings.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = _OnceFormatter(LINE_FORMAT, DATE_FORMAT)
    handlers: list[logging.Handler] = [
        _rotating(log_dir / f"{name}.log", settings, logging.DEBUG, formatter, _RotatingFile),
        _rotating(log_dir / f"{name}_errors.log", settings, logging.ERROR, formatter, _RotatingFile),
    ]
    if settings.log_stdout:
        stdout = _Stream(sys.stdout)
        stdout.setFormatter(formatter)
        handlers.append(stdout)
    _writer = LogWriter(handlers)
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


def _rotating(path: Path, settings: CommonSettings, level: int, formatter: logging.Formatter,
              cls: type[logging.handlers.RotatingFileHandler] = logging.handlers.RotatingFileHandler,
              ) -> logging.handlers.RotatingFileHandler:
    handler = cls(path, maxBytes=settings.log_max_bytes, backupCount=settings.log_backup_count, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(formatter)
    return handler


atexit.register(shutdown_logging)

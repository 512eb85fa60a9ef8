"""Logging for every service, in the layout of the users' monitoring guide.

`logs/<name>.log` receives everything at the configured level and above, `logs/<name>_errors.log`
only ERROR and CRITICAL; both rotate at 10 MB keeping 10 backups; lines also go to stdout.
The Inference service uses the name "api" (logs/api.log, logs/api_errors.log).

Records are handed to a background thread (QueueHandler/QueueListener) so that writing files
never stalls the event loop; the trace id is captured in the calling thread, where the span is.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from pathlib import Path

from opentelemetry import trace

from services.common.config import CommonSettings

LINE_FORMAT = "[%(asctime)s] %(levelname)s %(name)s [trace_id=%(trace_id)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_listener: logging.handlers.QueueListener | None = None


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


def setup_logging(settings: CommonSettings, name: str) -> Path:
    """Route the root logger to logs/<name>.log, logs/<name>_errors.log and stdout.

    Returns the log folder. Calling it again replaces the previous set-up.
    """
    global _listener
    shutdown_logging()
    log_dir = Path(settings.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LINE_FORMAT, DATE_FORMAT)
    handlers: list[logging.Handler] = [
        _rotating(log_dir / f"{name}.log", settings, logging.DEBUG, formatter),
        _rotating(log_dir / f"{name}_errors.log", settings, logging.ERROR, formatter),
    ]
    if settings.log_stdout:
        stdout = logging.StreamHandler(sys.stdout)
        stdout.setFormatter(formatter)
        handlers.append(stdout)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    front = _DeferredQueueHandler(records)
    front.addFilter(TraceIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(front)
    root.setLevel(settings.log_level)
    _listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    _listener.start()
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
    """Flush and stop the background writer (also run at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None


def _rotating(path: Path, settings: CommonSettings, level: int, formatter: logging.Formatter) -> logging.Handler:
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=settings.log_max_bytes, backupCount=settings.log_backup_count, encoding="utf-8"
    )
    handler.setLevel(level)
    handler.setFormatter(formatter)
    return handler


atexit.register(shutdown_logging)

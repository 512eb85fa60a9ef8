"""Several Inference server processes on one port (FASHION_INFERENCE_PROCESSES > 1): the parent.

The way grpc's Python multiprocessing example does it: each server process binds the same port with
SO_REUSEPORT and the kernel spreads new connections between them; the parent creates no gRPC
object (it does not fork: each child is a fresh `python -m services.inference`). Each child runs
the whole service as with one process (its own batcher, worker processes and share of the cores:
services.inference.cpus), and what must stay one is kept one:

  logs      each child sends its formatted lines over a socket (logs.ForwardSink); the parent's one
            LogWriter writes logs/api.log, api_errors.log and stdout, rotating as with one process
  metrics   the children write prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set
            in their environment before they import it); the parent serves their sum on the one
            metrics port (HTTPS when TLS is on) and marks the files of a child that died (mark_process_dead)
  stats     GetStats and KServe ModelStatistics: summed across the children through the run folder
            (services.inference.siblings)
  health    each child reports SERVING once every child's model is warm
  SIGTERM   (or SIGINT) forwarded to every child, which stops as one process does (NOT_SERVING,
            in-flight calls drained); the parent waits for them and exits 0
  a child that dies is restarted (after 1, 2, 5, 10, 30 s when it keeps dying within a minute of
            its start); its calls stay counted in GetStats, ModelStatistics and /metrics. The
            replacement (REPLACEMENT_ENV in its environment) loads and warms its model before it binds
            the port, so the kernel hands it no connection before it can answer; meanwhile its warm
            siblings take them all
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from services.common.bootstrap import killing_signal
from services.common.config import InferenceSettings
from services.common.logs import FORWARD_FD_ENV, forward_lines, setup_logging, shutdown_logging
from services.common.metrics import start_metrics_server, summed_registry
from services.common.security import metrics_tls, metrics_token_check
from services.inference.siblings import RUN_DIR_ENV, STARTED_ENV

log = logging.getLogger(__name__)

RESTART_DELAYS_S = (1, 2, 5, 10, 30)
STABLE_S = 60.0
"""A child that ran this long before dying is restarted at once (its backoff starts again)."""
STOP_MARGIN_S = 30.0
"""How long past the drain grace the parent waits for its children before it kills them."""
PARENT_PID_ENV = "_FASHION_INFERENCE_PARENT"
REPLACEMENT_ENV = "_FASHION_INFERENCE_REPLACEMENT"
"""Set for a child started in place of one that died: it gets ready before it binds the shared port."""
RUN_FOLDER_NEEDS_BYTES = 4 * 1024 * 1024
"""Free space a server process needs in the run folder: its prometheus-client files are mapped in memory,
and a page of them that the full filesystem cannot give kills it with SIGBUS, saying nothing."""


def is_child() -> bool:
    """Whether this process is one of the server processes a parent started."""
    return RUN_DIR_ENV in os.environ


def is_replacement() -> bool:
    """Whether this server process replaces one that died (its siblings already serve the port)."""
    return os.environ.get(REPLACEMENT_ENV) == "1"


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    reader: threading.Thread | None = None


class Supervisor:
    """Starts `processes` server processes, restarts those that die, stops them all on SIGTERM."""

    def __init__(self, settings: InferenceSettings, processes: int) -> None:
        self.settings = settings
        self.processes = processes
        self.run_dir = Path(tempfile.mkdtemp(prefix="fashion-inference-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.started = time.time()
        self.children: dict[int, _Child] = {}
        self.failures = [0] * processes
        self.stopping = threading.Event()

    def _environment(self) -> dict[str, str]:
        return {**os.environ,
                "FASHION_INFERENCE_PROCESSES": str(self.processes),
                "FASHION_INFERENCE_METRICS_PORT": "0",  # the parent serves the sum
                "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                RUN_DIR_ENV: str(self.run_dir), STARTED_ENV: repr(self.started),
                PARENT_PID_ENV: str(os.getpid())}

    def start_child(self, index: int, replacement: bool = False) -> None:
        """Start server process `index`; a `replacement` of one that died gets ready before it binds."""
        parent_end, child_end = socket.socketpair()
        try:
            env = {**self._environment(), FORWARD_FD_ENV: str(child_end.fileno())}
            if replacement:
                env[REPLACEMENT_ENV] = "1"
            proc = subprocess.Popen([sys.executable, "-m", "services.inference"], env=env,
                                    pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        reader = threading.Thread(target=forward_lines, args=(parent_end,), name=f"logs-{index}", daemon=True)
        reader.start()
        self.children[index] = _Child(index, proc, reader=reader)
        log.info("Inference server process %d of %d %s (pid %d)", index + 1, self.processes,
                 "restarted" if replacement else "started", proc.pid)

    def room_for_child(self, index: int) -> bool:
        """Whether the run folder has RUN_FOLDER_NEEDS_BYTES free for server process `index`; when not,
        logs why it is not started (and is tried again later)."""
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError as exc:
            log.error("Inference server process %d not started: cannot look at its run folder %s: %s",
                      index + 1, self.run_dir, exc)
            return False
        if free >= RUN_FOLDER_NEEDS_BYTES:
            return True
        log.error("Inference server process %d not started: its run folder %s (under TMPDIR) has %d KiB free and "
                  "a server process needs %d KiB there for its metrics files (PROMETHEUS_MULTIPROC_DIR); free "
                  "space on that filesystem or set TMPDIR to another", index + 1, self.run_dir, free // 1024,
                  RUN_FOLDER_NEEDS_BYTES // 1024)
        return False

    def _child_exited(self, child: _Child) -> None:
        pid = child.proc.pid
        mark_process_dead(pid, str(self.metrics_dir))
        stats = self.run_dir / f"stats-{pid}.json"
        if stats.exists():
            stats.replace(self.run_dir / f"retired-{pid}.json")  # its calls stay counted
        if child.reader is not None:
            child.reader.join(5)  # its last lines

    def supervise(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit code."""
        for i in range(self.processes):
            self.start_child(i)
        restart_at: dict[int, float] = {}
        while not self.stopping.wait(0.1):
            for index, child in list(self.children.items()):
                if child.proc.poll() is None:
                    continue
                del self.children[index]
                self._child_exited(child)
                ran = time.monotonic() - child.started
                self.failures[index] = 0 if ran >= STABLE_S else self.failures[index] + 1
                delay = 0 if self.failures[index] == 0 else RESTART_DELAYS_S[
                    min(self.failures[index], len(RESTART_DELAYS_S)) - 1]
                log.error("Inference server process %d (pid %d) exited with %s after %.0fs; restarting it%s",
                          index + 1, child.proc.pid, exit_status(child.proc.returncode), ran,
                          f" in {delay}s" if delay else "")
                restart_at[index] = time.monotonic() + delay
            for index, when in list(restart_at.items()):
                if time.monotonic() < when:
                    continue
                if not self.room_for_child(index):  # started now, it would die of SIGBUS: try again later
                    self.failures[index] += 1
                    restart_at[index] = time.monotonic() + RESTART_DELAYS_S[
                        min(self.failures[index], len(RESTART_DELAYS_S)) - 1]
                    continue
                del restart_at[index]
                self.start_child(index, replacement=True)
        return self.stop_all()

    def stop_all(self) -> int:
        """SIGTERM to every child, wait for their graceful stop (killing what is left after the drain
        grace plus STOP_MARGIN_S); 0 when every one stopped by itself with exit code 0."""
        log.info("Stopping %d Inference server processes", len(self.children))
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + STOP_MARGIN_S
        code = 0
        for child in self.children.values():
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("Inference server process %d (pid %d) did not stop: killed", child.index + 1, child.proc.pid)
                child.proc.kill()
                child.proc.wait()
            if child.proc.returncode != 0:
                code = 1
            self._child_exited(child)
        self.children.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return code


def exit_status(code: int | None) -> str:
    """A child's exit status as the log shows it: the signal's name beside a negative one (-7 (SIGBUS))."""
    name = killing_signal(code)
    return f"{code} ({name})" if name else str(code)


def supervise(settings: InferenceSettings, processes: int) -> int:
    """The parent of `processes` Inference server processes; returns its exit code."""
    setup_logging(settings, "api", "inference")
    supervisor = Supervisor(settings, processes)

    def stop(signum: int, frame: object) -> None:
        supervisor.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    registry = summed_registry("inference", str(supervisor.metrics_dir))
    start_metrics_server("inference", settings.inference_metrics_port,
                         settings.listen_host(settings.inference_host), metrics_token_check(settings), registry,
                         metrics_tls(settings))
    log.info("Inference service: %d server processes on %s (run folder %s)", processes,
             settings.listen_address(settings.inference_host, settings.inference_port), supervisor.run_dir)
    try:
        code = supervisor.supervise()
    except BaseException:
        supervisor.stop_all()
        raise
    log.info("Stopped")
    shutdown_logging()
    return code

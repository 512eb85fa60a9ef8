"""`fashion run` as its supervisor of the stack, run as a user runs it (its own process, real services on
real ports): a closed terminal (SIGHUP), the launcher itself killed, its output gone (`| head`) while a
service dies, and a second Ctrl-C while a service will not stop. In each, no service outlives it and the
exit code says what happened (0 stopped on request, 1 a service died, 130 a stop cut short)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import alive, changed_command, free_port, health_status

SERVICES = ("inference", "batch")


class Stack:
    """`fashion run --only inference batch` in `workdir`, its output in `log` (or a pipe: `stdout`)."""

    def __init__(self, workdir: Path, model_dir: Path, piped: bool = False, stdout_closed: bool = False) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
        env = {**inherited, "PYTHONUNBUFFERED": "1", "OTEL_SDK_DISABLED": "true", "FASHION_MODEL_DIR": str(model_dir),
               "FASHION_INTRA_OP_THREADS": "1", "FASHION_SHUTDOWN_GRACE_S": "3", "FASHION_BATCH_FSYNC": "false",
               "FASHION_INFERENCE_PORT": str(self.ports["inference"]), "FASHION_BATCH_PORT": str(self.ports["batch"]),
               "FASHION_INFERENCE_METRICS_PORT": "0", "FASHION_BATCH_METRICS_PORT": "0",
               "FASHION_INFERENCE_ADDRESS": f"127.0.0.1:{self.ports['inference']}"}
        self.log = workdir / "run.out"
        with open(self.log, "wb") as out:
            command = changed_command([sys.executable, "-m", "fashion.cli", "run", "--only", *SERVICES],
                                      stdout_closed=stdout_closed)
            self.proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE if piped else out,
                                         stderr=out)
        self.pids: dict[str, int] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, lines: list[str] | None = None, named: bool = True) -> None:
        """Until both services answer SERVING; their pids from the start-up lines (read from the pipe into
        `lines` when piped, which is then left unread: a few log lines fit in its buffer; none when not
        `named`: the output goes nowhere)."""
        deadline = time.monotonic() + 90
        while (named and len(self.pids) < len(SERVICES)) or not all(self._serving(name) for name in SERVICES):
            assert time.monotonic() < deadline, f"the stack did not start:\n{self.output()[-3000:]}"
            assert self.proc.poll() is None, f"fashion run exited ({self.proc.returncode}):\n{self.output()[-3000:]}"
            text = self.output()
            if lines is not None:  # the launcher's lines among the services' own log lines, until both started
                if len(self.pids) < len(SERVICES):
                    lines.append(self.proc.stdout.readline().decode())  # type: ignore[union-attr]
                text = "".join(lines)
            self.pids = {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", text)}
            time.sleep(0.2)

    def _serving(self, name: str) -> bool:
        try:
            return health_status(f"127.0.0.1:{self.ports[name]}", timeout=1.0) == "SERVING"
        except Exception:
            return False

    def wait_gone(self, timeout: float = 60) -> list[str]:
        """The services still running after `timeout` (none, when all stopped)."""
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in self.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [name for name, pid in self.pids.items() if alive(pid)]

    def cleanup(self) -> None:
        """What a failed test leaves: the launcher and any service still running (by pid)."""
        for pid in [self.proc.pid, *self.pids.values()]:
            if alive(pid):
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    os.kill(pid, sig)
        self.proc.wait()


@pytest.fixture
def start_stack(tmp_path: Path, linear_model) -> Iterator:  # type: ignore[no-untyped-def]
    started: list[Stack] = []

    def start(piped: bool = False, stdout_closed: bool = False) -> Stack:
        started.append(Stack(tmp_path, linear_model[0], piped, stdout_closed))
        return started[-1]

    yield start
    for stack in started:
        stack.cleanup()


def test_a_closed_terminal_stops_every_service(start_stack) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP (the terminal closed, an ssh session gone) stops the stack as Ctrl-C does: the services run in
    sessions of their own, so the hang-up reaches only the launcher, which must pass it on."""
    stack = start_stack()
    stack.wait_serving()
    stack.proc.send_signal(signal.SIGHUP)
    assert stack.proc.wait(60) == 0, stack.output()[-3000:]
    assert stack.wait_gone(timeout=5) == [], f"left running after SIGHUP:\n{stack.output()[-3000:]}"
    assert "fashion run: stopped" in stack.output()


def test_no_service_outlives_a_killed_launcher(start_stack) -> None:  # type: ignore[no-untyped-def]
    """`fashion run` SIGKILLed (the OOM killer, `kill -9`): its services stop too, and free their ports for
    the next `make run`."""
    stack = start_stack()
    stack.wait_serving()
    stack.proc.kill()
    stack.proc.wait()
    assert stack.wait_gone() == [], "services left running after their launcher was killed"


def test_a_dying_service_stops_the_stack_with_exit_1_when_nobody_reads_the_output(  # type: ignore[no-untyped-def]
        start_stack) -> None:
    """`fashion run | head -3`: once the reader is gone, a service that dies still stops the others, and
    the exit code still says so (1), where the launcher's announcement used to end it with exit 0."""
    stack = start_stack(piped=True)
    lines: list[str] = []
    stack.wait_serving(lines)
    stack.proc.stdout.close()  # the reader goes away
    os.kill(stack.pids["inference"], signal.SIGKILL)
    assert stack.proc.wait(60) == 1, stack.output()[-3000:]
    assert stack.wait_gone(timeout=5) == [], f"left running:\n{stack.output()[-3000:]}"
    assert "Traceback" not in "".join(
        line for line in stack.output().splitlines(keepends=True) if "fashion/cli" in line or "launcher" in line)


def test_a_dying_service_is_named_with_its_signal(start_stack) -> None:  # type: ignore[no-untyped-def]
    stack = start_stack()
    stack.wait_serving()
    os.kill(stack.pids["batch"], signal.SIGKILL)
    assert stack.proc.wait(60) == 1, stack.output()[-3000:]
    assert "fashion run: batch was killed by SIGKILL; stopping the rest" in stack.output()
    assert stack.wait_gone(timeout=5) == []


def test_a_second_ctrl_c_kills_what_will_not_stop(start_stack) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C, then Ctrl-C again while a service is still stopping (here: frozen, SIGSTOP): the second one
    kills it at once, says so, and the exit code is 130 (interrupted), not a clean 0."""
    stack = start_stack()
    stack.wait_serving()
    os.kill(stack.pids["batch"], signal.SIGSTOP)  # it cannot act on SIGTERM
    stack.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while "fashion run: stopping" not in stack.output():
        assert time.monotonic() < deadline and stack.proc.poll() is None, stack.output()[-3000:]
        time.sleep(0.1)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(60) == 130, stack.output()[-3000:]
    assert "fashion run: batch is still stopping; killing it" in stack.output()
    assert stack.wait_gone(timeout=5) == []


def test_a_stack_started_with_stdout_closed_runs_and_stops_cleanly(start_stack) -> None:  # type: ignore[no-untyped-def]
    """`fashion run >&-` (a daemon manager that gives no stdout): the services' log writers get /dev/null in
    its place instead of dying on a missing stdout, one traceback per log line."""
    stack = start_stack(stdout_closed=True)
    stack.wait_serving(named=False)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(60) == 0, stack.output()[-3000:]
    assert "Traceback" not in stack.output(), stack.output()[-3000:]

"""An unusable FASHION_* value, met as a user meets it: every command and service says which variable
and why in one line and exits 2 (not 1, which means "unhealthy"); `--help` works regardless."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import changed_command

BAD = {"FASHION_BATCH_CHUNK_SIZE": "abc"}
LINE = "error: FASHION_BATCH_CHUNK_SIZE='abc': Input should be a valid integer, unable to parse string as an integer"


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **BAD, **env}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("command", [["--help"], ["batch", "--help"], ["batch", "run", "--help"],
                                     ["monitor", "health", "--help"], ["classify", "--help"], ["serve", "--help"]])
def test_help_works_whatever_the_settings(tmp_path: Path, command: list[str]) -> None:
    done = run(["-m", "fashion.cli", *command], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: fashion"), done.stderr
    assert not done.stderr


@pytest.mark.parametrize("command", [["-m", "fashion.cli", "batch", "run", "inbox"], ["-m", "fashion.cli", "config"],
                                     ["-m", "fashion.cli", "serve", "batch"], ["-m", "services.batch"]])
def test_an_unusable_value_is_one_line_naming_the_variable_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    done = run(command, tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines() == [LINE], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_each_unusable_value_gets_its_own_line(tmp_path: Path) -> None:
    done = run(["-m", "services.monitor"], tmp_path, FASHION_LOG_LEVEL="LOUD", FASHION_MONITOR_PORT="http")
    assert done.returncode == 2
    assert sorted(done.stderr.splitlines()) == sorted([  # the Batch service's own setting is not the Monitor's
        "error: FASHION_LOG_LEVEL='LOUD': Input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
        "error: FASHION_MONITOR_PORT='http': Input should be a valid integer, unable to parse string as an integer"])


def test_a_secret_that_is_refused_is_named_but_never_shown(tmp_path: Path) -> None:
    url = "mysql://batch:hunter2-secret@db:3306/jobs"
    done = subprocess.run([sys.executable, "-m", "services.batch"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "FASHION_BATCH_DATABASE_URL": url}, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: FASHION_BATCH_DATABASE_URL: Value error, must be a PostgreSQL URL: "
                                        "postgresql://user:password@host:5432/database"], done.stderr
    assert "hunter2" not in done.stdout + done.stderr


PORT_SETTINGS = {
    "services.inference": ("FASHION_INFERENCE_PORT", "FASHION_INFERENCE_METRICS_PORT"),
    "services.batch": ("FASHION_BATCH_PORT", "FASHION_BATCH_METRICS_PORT"),
    "services.monitor": ("FASHION_MONITOR_PORT", "FASHION_MONITOR_METRICS_PORT"),
    "services.gateway": ("FASHION_GATEWAY_PORT",),
}


@pytest.mark.parametrize(("module", "setting", "extra"), [
    ("services.inference", "FASHION_INFERENCE_PORT", {}),
    ("services.inference", "FASHION_INFERENCE_METRICS_PORT", {}),
    ("services.inference", "FASHION_INFERENCE_PORT", {"FASHION_INFERENCE_PROCESSES": "2"}),  # the parent
    ("services.batch", "FASHION_BATCH_PORT", {}),
    ("services.monitor", "FASHION_MONITOR_METRICS_PORT", {}),
    ("services.gateway", "FASHION_GATEWAY_PORT", {"FASHION_GATEWAY_WORKERS": "2"}),
])
def test_a_port_another_program_holds_is_one_line_naming_the_setting_and_exit_2(
        tmp_path: Path, module: str, setting: str, extra: dict[str, str]) -> None:
    """The commonest first-run failure (an earlier `make run` still going, another program on 8080):
    one line naming the setting, exit 2, nothing started (no log file written)."""
    from tests.support import free_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**{name: str(free_port()) for name in PORT_SETTINGS[module]}, setting: str(port), **extra}
        done = subprocess.run([sys.executable, "-m", module], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "FASHION_BIND_ADDRESS": "127.0.0.1", **env}, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port} ({setting}): the port is in use: "
                                        "another program listens there (an earlier run still going?)"], done.stderr
    assert not (tmp_path / "logs").exists()


def test_a_port_is_free_again_once_its_holder_is_gone(tmp_path: Path) -> None:
    """The check itself leaves nothing bound: the service it refused starts on the same port later."""
    from services.common.ports import listen_problem

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        holder.listen()
        assert "in use" in (listen_problem("127.0.0.1", port) or "")
    assert listen_problem("127.0.0.1", port) is None
    assert listen_problem("127.0.0.1", port) is None  # twice: the probe released it
    assert listen_problem("192.0.2.1", port) == "this machine has no address 192.0.2.1"


def test_fashion_config_prints_every_setting_as_name_equals_value_with_secrets_masked(tmp_path: Path) -> None:
    from services.common.config import settings_rows

    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
    env.update(FASHION_BATCH_CHUNK_SIZE="7", FASHION_AUTH_TOKEN="sekrit-token-value", COLUMNS="80")
    done = subprocess.run([sys.executable, "-m", "fashion.cli", "config"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert "FASHION_BATCH_CHUNK_SIZE=7" in lines and "FASHION_AUTH_TOKEN=**********" in lines
    assert "sekrit" not in done.stdout
    assert [line.split("=", 1)[0] for line in lines if not line.startswith(" ")] == [row[0] for row in settings_rows()]
    assert all(len(line) <= 80 for line in lines if line.startswith("    "))  # meanings wrapped to the terminal

    # Piped into a reader that has stopped reading (`| head` once it has its lines; here `true`, gone before the
    # first line): no BrokenPipeError traceback, exit 0.
    piped = subprocess.run(f"set -o pipefail; {sys.executable} -m fashion.cli config | true", shell=True,
                           executable="/bin/bash", cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and not piped.stderr, piped


@pytest.mark.parametrize(("env", "line"), [
    ({"FASHION_TLS": "true", "FASHION_TLS_CA": "no-such-ca.pem"},
     "error: cannot read the TLS file no-such-ca.pem (FASHION_TLS_CA): No such file or directory"),
    ({"FASHION_AUTH_TOKEN_FILE": "no-such-token"}, "error: cannot read the token file no-such-token: No such file or "
                                                   "directory"),
])
def test_a_command_with_an_unreadable_tls_or_token_file_says_which_in_one_line(
        tmp_path: Path, env: dict[str, str], line: str) -> None:
    from tests.support import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    for command in (["stats", "--address", nowhere], ["batch", "list", "--address", nowhere],
                    ["monitor", "health", "--embedded"]):
        done = subprocess.run([sys.executable, "-m", "fashion.cli", *command], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=60)
        assert done.returncode == 2 and done.stderr.splitlines() == [line], (command, done.stdout, done.stderr)


def test_a_tls_file_the_process_may_not_read_is_named_with_the_reason(tmp_path: Path) -> None:
    """A CA bundle mounted without read permission for the service's user (CI runs as root: the child
    drops the right to ignore file permissions): the service refuses to start, the command says so."""
    from tests.support import free_port

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    ca.chmod(0o000)
    line = f"error: cannot read the TLS file {ca} (FASHION_TLS_CA): Permission denied"
    env = {**os.environ, "FASHION_TLS": "true", "FASHION_TLS_CA": str(ca), "FASHION_LOG_DIR": str(tmp_path / "logs")}
    nowhere = f"127.0.0.1:{free_port()}"
    for command in (["-m", "services.monitor"], ["-m", "fashion.cli", "stats", "--address", nowhere]):
        done = subprocess.run(changed_command([sys.executable, *command], unprivileged=True), cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 2 and done.stderr.splitlines() == [line], (command, done.stdout, done.stderr)


@pytest.mark.parametrize("module", ["services.batch", "services.monitor", "services.inference", "services.gateway"])
def test_a_log_folder_it_may_not_write_is_one_line_naming_it_and_exit_2(tmp_path: Path, module: str) -> None:
    """FASHION_LOG_DIR in a folder the service may not write (run without root's right to ignore file
    permissions): one line naming the folder and the variable, exit 2, before anything listens; it was a
    traceback and exit 1. A full disk is no reason to stop (the logs say what they lost)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    env = {k: v for k, v in os.environ.items() if k not in BAD}
    env.update(FASHION_LOG_DIR=str(locked / "logs"), FASHION_LOG_FILES="true", FASHION_DATA_ROOT=str(tmp_path / "data"),
               FASHION_MONITOR_STATE_DB=str(tmp_path / "monitor.db"), OTEL_SDK_DISABLED="true")
    done = subprocess.run(changed_command([sys.executable, "-m", module], unprivileged=True), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines() == [
        f"error: cannot write log files in {locked / 'logs'} (FASHION_LOG_DIR): Permission denied"], done.stderr

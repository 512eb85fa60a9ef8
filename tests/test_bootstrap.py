"""The one bootstrap of the three gRPC services (services.common.bootstrap), met as an operator meets
it: each service runs on uvloop, writes its own log files, is SERVING once ready, stops gracefully on
SIGTERM; TLS or token settings that cannot work stop any of them before it starts, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import services
from tests.batch.conftest import BatchHome
from tests.conftest import start_inference
from tests.monitor.conftest import monitor_env
from tests.support import ServiceProcess, free_port, start_service


def unused_address() -> str:
    return f"127.0.0.1:{free_port()}"


def uses_uvloop(pid: int) -> bool:
    return "/uvloop/" in Path(f"/proc/{pid}/maps").read_text()


def test_each_service_runs_on_uvloop_logs_to_its_own_files_and_stops_on_sigterm(tmp_path: Path,
                                                                                linear_model) -> None:
    pytest.importorskip("uvloop")
    inference = start_inference(tmp_path / "inference", linear_model[0])
    batch = BatchHome(tmp_path / "batch").start(unused_address(), wait=False)
    env = monitor_env(tmp_path / "monitor", unused_address(), unused_address())
    monitor = start_service("services.monitor", tmp_path / "monitor", env, f"127.0.0.1:{env['FASHION_MONITOR_PORT']}")
    services: dict[str, tuple[ServiceProcess, Path, str]] = {
        "Inference": (inference, tmp_path / "inference" / "logs", "api"),
        "Batch": (batch, tmp_path / "batch" / "logs", "batch_service"),
        "Monitor": (monitor, tmp_path / "monitor" / "logs", "monitor"),
    }
    try:
        for svc, _, _ in services.values():
            svc.wait_serving()
        for name, (svc, logs, log_name) in services.items():
            assert uses_uvloop(svc.proc.pid), f"the {name} service runs on asyncio's loop"
            assert svc.terminate() == 0, svc.output()
            assert "Unknown experiment" not in svc.output(), "grpcio no longer has an experiment GRPC_EXPERIMENTS names"
            text = (logs / f"{log_name}.log").read_text()
            assert (logs / f"{log_name}_errors.log").exists()
            for line in (f"{name} service listening on {svc.address}", f"{name} service SERVING",
                         "Shutting down: marking NOT_SERVING", "Stopped"):
                assert line in text, (line, text)
    finally:
        for svc, _, _ in services.values():
            svc.kill()


@pytest.mark.parametrize(("given", "expected"), [(None, services.GRPC_EXPERIMENTS),
                                                 ("-event_engine_client", "-event_engine_client")])
def test_grpc_experiments_are_set_before_grpc_is_imported_and_the_environment_wins(
        given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if given:
        env["GRPC_EXPERIMENTS"] = given
    code = "import services.common.server, os, sys; print(os.environ['GRPC_EXPERIMENTS'], 'grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=Path(services.__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, "True"]
    assert "Unknown experiment" not in out.stderr, "grpcio no longer has an experiment GRPC_EXPERIMENTS names"


@pytest.mark.parametrize("module", ["services.inference", "services.batch", "services.monitor", "services.gateway"])
@pytest.mark.parametrize(("env", "message"), [
    ({"FASHION_TLS_CERT": "server.pem"}, "error: FASHION_TLS_CERT and FASHION_TLS_KEY must be set together"),
    ({"FASHION_AUTH_TOKEN_FILE": "no-such-token"}, "error: cannot read the token file no-such-token"),
    # The CA bundle of the calls to other services: every check of the Monitor failed on it, silently.
    ({"FASHION_TLS": "true", "FASHION_TLS_CA": "no-such-ca.pem"},
     "error: cannot read the TLS file no-such-ca.pem (FASHION_TLS_CA): No such file or directory"),
])
def test_security_settings_that_cannot_work_stop_the_start_in_one_line(
        tmp_path: Path, module: str, env: dict[str, str], message: str) -> None:
    run = subprocess.run([sys.executable, "-m", module], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FASHION_LOG_DIR": str(tmp_path / "logs"), **env})
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(message), run.stderr

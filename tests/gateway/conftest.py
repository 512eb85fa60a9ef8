"""Gateway processes (`python -m services.gateway`, uvicorn) on real ports, in front of real services."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ChildProcess, OtlpCollector, ServiceProcess, free_port


@dataclass
class GatewayProcess(ChildProcess):
    proc: subprocess.Popen[bytes]
    url: str
    workdir: Path
    log_path: Path

    def wait_ready(self, timeout: float = 60.0, **client_kw: object) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0, **client_kw).status_code == 200:  # type: ignore[arg-type]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not ready after {timeout}s:\n{self.output()}")


def start_gateway(workdir: Path, inference_address: str, scheme: str = "http", **env: str) -> GatewayProcess:
    """`python -m services.gateway` in `workdir` (its logs in workdir/logs), on a free port."""
    port = free_port()
    full_env = {
        **os.environ, "PYTHONUNBUFFERED": "1", "FASHION_GATEWAY_HOST": "127.0.0.1",
        "FASHION_GATEWAY_PORT": str(port), "FASHION_INFERENCE_ADDRESS": inference_address,
        "FASHION_BATCH_ADDRESS": f"127.0.0.1:{free_port()}", "FASHION_MONITOR_ADDRESS": f"127.0.0.1:{free_port()}",
        "FASHION_SHUTDOWN_GRACE_S": "3", **env,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "gateway.out"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=workdir, env=full_env,
                                stdout=out, stderr=subprocess.STDOUT)
    return GatewayProcess(proc, f"{scheme}://127.0.0.1:{port}", workdir, log_path)


@pytest.fixture(scope="session", params=["fast path", "framework route"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            inference_server: ServiceProcess) -> Iterator[GatewayProcess]:
    """A gateway in front of the shared Inference service (no Batch or Monitor service behind it).
    Twice: as it runs by default (POST /predict answered by PredictFastPath) and with traces
    exported (every route served by FastAPI, with its server spans), so that both ways of
    answering /predict pass the same tests."""
    collector = OtlpCollector() if request.param == "framework route" else None
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), inference_server.address, FASHION_MAX_UPLOAD_BYTES="65536",
                       FASHION_MAX_BATCH_UPLOAD_BYTES="262144", FASHION_MAX_BATCH_FILES="8",
                       **(collector.env if collector else {}))
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.terminate()
        if collector:
            collector.stop()

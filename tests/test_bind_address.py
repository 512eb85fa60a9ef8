"""FASHION_BIND_ADDRESS set but empty (`FASHION_BIND_ADDRESS=` in a .env file, a variable expanding to
nothing) would bind every interface: each service refuses it in one line naming the variable, exit 2,
before listening anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port


@pytest.mark.parametrize("service", ["services.gateway", "services.monitor", "services.batch", "services.inference"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_bind_address_is_refused_before_anything_listens(tmp_path: Path, service: str, blank: str) -> None:
    env = {**os.environ, "FASHION_BIND_ADDRESS": blank, "FASHION_LOG_DIR": str(tmp_path / "logs"),
           "FASHION_GATEWAY_PORT": str(free_port()), "FASHION_MONITOR_METRICS_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", service], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith(f"error: FASHION_BIND_ADDRESS={blank!r}: Value error, must name an interface"), \
        done.stderr
    assert "Traceback" not in done.stdout + done.stderr

"""A stale token is a configuration error that names itself: a peer refusing our token is logged as
an ERROR naming where our token comes from (never the token), fails a batch job with that reason,
and makes `fashion monitor health` say so and exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fashion.client import BatchClient, ChannelOptions
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import BatchHome, write_images
from tests.conftest import start_inference
from tests.monitor.conftest import monitor_env, start_monitor

GOOD, STALE = "current-token-61c2", "stale-token-0d9e"


def logged(path: Path, needle: str, timeout: float = 10.0) -> str:
    """The log file's text once it holds `needle` (lines are written by a background thread)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_a_peer_refusing_our_token_is_named_in_the_job_the_health_check_and_the_errors_log(
        tmp_path: Path, linear_model) -> None:
    good, stale = tmp_path / "good-token", tmp_path / "stale-token"
    good.write_text(f"{GOOD}\n")
    stale.write_text(f"{STALE}\n")
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_AUTH_TOKEN_FILE=str(good))
    processes = [inference]
    try:
        inference.wait_serving()
        # A Batch service left with the stale token (its own server takes that one too).
        home = BatchHome(tmp_path / "batch")
        write_images(home.data / "inbox", 3)
        batch = home.start(inference.address, FASHION_AUTH_TOKEN_FILE=str(stale))
        processes.append(batch)
        with BatchClient(ChannelOptions(batch.address, token_file=stale)) as client:
            job = client.wait(client.submit("inbox").job_id, timeout_s=60)
        assert job.state == pb.JOB_STATE_FAILED, job
        assert "the Inference service refused our bearer token (invalid bearer token)" in job.error
        assert f"FASHION_AUTH_TOKEN_FILE={stale}" in job.error
        errors = logged(home.workdir / "logs" / "batch_service_errors.log", "refused our bearer token")
        assert "refused our bearer token" in errors and str(stale) in errors
        assert sorted(p.name for p in (home.data / "inbox").iterdir()) == [f"item_{i:04d}.png" for i in range(3)]

        # A Monitor with the stale token: the services answer health checks, but refuse its calls.
        workdir = tmp_path / "monitor"
        env = monitor_env(workdir, inference.address, batch.address, FASHION_AUTH_TOKEN_FILE=str(stale))
        monitor = start_monitor(workdir, env)
        processes.append(monitor)
        cli = subprocess.run([sys.executable, "-m", "fashion.cli", "monitor", "health", "--address", monitor.address],
                             env={**os.environ, "FASHION_AUTH_TOKEN_FILE": str(stale), "COLUMNS": "400"},
                             capture_output=True,
                             text=True, timeout=60)
        assert cli.returncode == 1, cli.stdout + cli.stderr
        assert f"the Inference service at {inference.address} refused our bearer token" in cli.stdout, cli.stdout
        assert str(stale) in cli.stdout
        monitor_errors = logged(workdir / "logs" / "monitor_errors.log", "refused our bearer token")
        assert "refused our bearer token" in monitor_errors and str(stale) in monitor_errors
        for folder in (home.workdir, workdir, tmp_path / "inference"):
            for path in (p for p in folder.rglob("*") if p.is_file() and p.suffix in (".log", ".out")):
                text = path.read_text(errors="replace")
                assert GOOD not in text and STALE not in text, f"a token written to {path}"
    finally:
        for process in reversed(processes):
            process.terminate()

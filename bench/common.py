"""What the benchmark sections share: the model under test, service processes, the load generator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.common.config import SHIPPED_MODEL_DIR
from tests.support import ServiceProcess, build_linear_model, free_port, start_service

REPO = Path(__file__).resolve().parents[1]


def model_dir(work: Path) -> tuple[Path, str]:
    """The shipped model when it exists, else a small fixture model (named as such in reports)."""
    if (SHIPPED_MODEL_DIR / "model.onnx").exists():
        return SHIPPED_MODEL_DIR, "shipped model"
    folder = work / "fixture-model"
    build_linear_model(folder)
    return folder, "FIXTURE linear model (shipped model missing)"


def start_inference(work: Path, model: Path, **env: str) -> ServiceProcess:
    """The Inference service with its default settings, on free ports, logging to `work`."""
    port = free_port()
    svc = start_service("services.inference", work, {
        "FASHION_MODEL_DIR": str(model), "FASHION_INFERENCE_PORT": str(port),
        "FASHION_INFERENCE_METRICS_PORT": str(free_port()), "FASHION_LOG_STDOUT": "false", **env,
    }, f"127.0.0.1:{port}")
    svc.wait_serving(timeout=120)
    return svc


def loadgen_command(mode: str, address: str, concurrency: int, seconds: float = 8.0, warmup: float = 2.0,
                    **extra: object) -> list[str]:
    """The command line of one bench.loadgen run (`extra`: its other options, as keyword arguments)."""
    args = [sys.executable, "-m", "bench.loadgen", "--mode", mode, "--address", address,
            "--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def loadgen(mode: str, address: str, concurrency: int, seconds: float = 8.0, warmup: float = 2.0,
            **extra: object) -> dict[str, float]:
    """Run bench.loadgen in its own process; its JSON result."""
    args = loadgen_command(mode, address, concurrency, seconds, warmup, **extra)
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=seconds + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` (all its threads) so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["free_port", "loadgen", "model_dir", "start_inference", "table"]

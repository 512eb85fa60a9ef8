"""One user at a time, A/B: the services of another checkout against this one, in alternating rounds, with
the bench's own load generators at concurrency 1 (Classify, ModelInfer UINT8, the gateway's POST /predict),
and the Flask baseline (2 sync workers) beside them. Each side runs from its own tree, on the same model.

    git worktree add --detach /tmp/ab-old <commit>
    python -m bench.ab_one_user /tmp/ab-old [rounds]

prints one line per measurement: round, target, p50 ms, p99 ms, images/s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import REPO, free_port, loadgen, model_dir
from bench.gateway import httpload, start_flask, start_gateway, stop
from services.inference.model import ModelManifest
from tests.support import ServiceProcess, start_service

SECONDS, WARMUP = 6.0, 1.5


def start_side(tree: Path, side: str, work: Path, model: Path) -> tuple[ServiceProcess, subprocess.Popen[bytes], str]:
    """The Inference service and a gateway in front of it, both running the code of `tree`."""
    env = {"PYTHONPATH": f"{tree}/clients:{tree}", "FASHION_LOG_STDOUT": "false"}
    port = free_port()
    inference = start_service("services.inference", work / f"inference-{side}", {
        **env, "FASHION_MODEL_DIR": str(model), "FASHION_INFERENCE_PORT": str(port),
        "FASHION_INFERENCE_METRICS_PORT": str(free_port())}, f"127.0.0.1:{port}")
    inference.wait_serving(timeout=120)
    gateway, url = start_gateway(inference.address, work, f"gateway-{side}", cwd=tree, env=env)
    return inference, gateway, url


def stop_all(servers: list[subprocess.Popen[bytes]], services: list[ServiceProcess]) -> None:
    """Stop the gateways (and Flask) first, then the Inference services behind them."""
    for server in servers:
        stop(server)
    for inference in services:
        inference.terminate()


def main() -> None:
    other, rounds = Path(sys.argv[1]).resolve(), int(sys.argv[2]) if len(sys.argv) > 2 else 3
    work = REPO / "bench" / "work" / "ab_one_user"
    work.mkdir(parents=True, exist_ok=True)
    model, _ = model_dir(work)
    name = ModelManifest.load(model).name
    services: list[ServiceProcess] = []
    servers: list[subprocess.Popen[bytes]] = []
    targets: dict[str, tuple[str, str]] = {}
    try:
        for side, tree in (("other", other), ("this", REPO)):
            inference, gateway, url = start_side(tree, side, work, model)
            services.append(inference)
            servers.append(gateway)
            targets |= {f"{side} Classify": ("classify", inference.address),
                        f"{side} ModelInfer UINT8": ("modelinfer", inference.address),
                        f"{side} POST /predict": ("http", url)}
        flask, flask_url = start_flask(model, work, "flask")
        servers.append(flask)
        targets["Flask POST /predict"] = ("http", flask_url)
        for n in range(1, rounds + 1):
            for target, (kind, address) in targets.items():
                if kind == "http":
                    r = httpload(address, 1, SECONDS, WARMUP)
                elif kind == "modelinfer":
                    r = loadgen(kind, address, 1, SECONDS, WARMUP, model=name, model_dir=model, form="uint8")
                else:
                    r = loadgen(kind, address, 1, SECONDS, WARMUP)
                print(f"{n} | {target} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['images_per_s']:.0f}", flush=True)
    finally:
        stop_all(servers, services)


if __name__ == "__main__":
    main()

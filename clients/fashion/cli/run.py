"""`fashion run` (what `make run` calls): the whole local stack in the foreground.

Each service runs in its own process (as in production, one per container); Ctrl-C or SIGTERM
stops them all gracefully. If one exits on its own, the others are stopped too.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from fashion.cli.serve import SERVICES

STOP_TIMEOUT_S = 20.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole local stack in the foreground (Ctrl-C stops it)")
    p.add_argument("--only", nargs="+", choices=sorted(SERVICES), help="run only these services")
    p.set_defaults(func=run)


def listeners() -> dict[str, str]:
    """Where each service listens, from the same settings the services read (FASHION_BIND_ADDRESS and
    the per-service host and port variables)."""
    from services.common.config import BatchSettings, GatewaySettings, InferenceSettings, MonitorSettings

    def grpc_and_metrics(settings: InferenceSettings | BatchSettings | MonitorSettings, host: str | None,
                         port: int, metrics_port: int) -> str:
        metrics = (f"metrics http://{settings.listen_address(host, metrics_port)}/metrics" if metrics_port > 0
                   else "metrics off")
        return f"gRPC {settings.listen_address(host, port)}, {metrics}"

    inference, batch, monitor, gateway = InferenceSettings(), BatchSettings(), MonitorSettings(), GatewaySettings()
    web = gateway.listen_address(gateway.gateway_host, gateway.gateway_port)
    return {
        "inference": grpc_and_metrics(inference, inference.inference_host, inference.inference_port,
                                      inference.inference_metrics_port),
        "batch": grpc_and_metrics(batch, batch.batch_host, batch.batch_port, batch.batch_metrics_port),
        "monitor": grpc_and_metrics(monitor, monitor.monitor_host, monitor.monitor_port, monitor.monitor_metrics_port),
        "gateway": f"HTTP http://{web} (/docs, /metrics)",
    }


def run(args: argparse.Namespace) -> int:
    names = args.only or list(SERVICES)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    where = listeners()
    for name in names:
        # Own process group: the terminal's Ctrl-C reaches us once; we stop the children in order.
        procs[name] = subprocess.Popen([sys.executable, "-m", "fashion.cli", "serve", name],
                                       env=os.environ.copy(), start_new_session=True)
        print(f"fashion run: started {name} (pid {procs[name].pid}): {where[name]}", flush=True)
    print("fashion run: Ctrl-C stops everything", flush=True)
    exit_code = 0
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"fashion run: {name} exited with status {proc.returncode}; stopping the rest", flush=True)
                exit_code = 1
                stopping = True
        time.sleep(0.2)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"fashion run: {name} did not stop in time; killing it", flush=True)
            proc.kill()
            proc.wait()
    print("fashion run: stopped", flush=True)
    return exit_code

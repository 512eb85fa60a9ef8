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

    def metrics(settings: InferenceSettings | BatchSettings | MonitorSettings, host: str | None, port: int) -> str:
        if port <= 0:
            return "metrics off"
        bare = settings.listen_host(host)
        return f"metrics http://{f'[{bare}]' if ':' in bare else bare}:{port}/metrics"

    inference, batch, monitor, gateway = InferenceSettings(), BatchSettings(), MonitorSettings(), GatewaySettings()
    web = gateway.listen_host(gateway.gateway_host)
    return {
        "inference": f"gRPC {inference.grpc_listen_address(inference.inference_host, inference.inference_port)}, "
                     + metrics(inference, inference.inference_host, inference.inference_metrics_port),
        "batch": f"gRPC {batch.grpc_listen_address(batch.batch_host, batch.batch_port)}, "
                 + metrics(batch, batch.batch_host, batch.batch_metrics_port),
        "monitor": f"gRPC {monitor.grpc_listen_address(monitor.monitor_host, monitor.monitor_port)}, "
                   + metrics(monitor, monitor.monitor_host, monitor.monitor_metrics_port),
        "gateway": f"HTTP http://{f'[{web}]' if ':' in web else web}:{gateway.gateway_port} (/docs, /metrics)",
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
    for name in names:
        # Own process group: the terminal's Ctrl-C reaches us once; we stop the children in order.
        procs[name] = subprocess.Popen([sys.executable, "-m", "fashion.cli", "serve", name],
                                       env=os.environ.copy(), start_new_session=True)
        print(f"fashion run: started {name} (pid {procs[name].pid}): {listeners()[name]}", flush=True)
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

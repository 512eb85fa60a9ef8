"""Running the services: one in the foreground (`fashion serve NAME`) or the whole local stack
(`fashion run`, what `make run` calls).

In the stack each service runs in its own process (as in production, one per container); Ctrl-C or
SIGTERM stops them all gracefully. If one exits on its own, the others are stopped too.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

from services.common.bootstrap import Port, gateway_port, grpc_service_ports, refuse_unusable_ports
from services.common.config import BatchSettings, GatewaySettings, InferenceSettings, MonitorSettings, load_settings
from services.common.security import SecurityConfigError, tls_enabled

# service name -> module with a main() that runs it
SERVICES = {
    "inference": "services.inference.app",
    "batch": "services.batch.app",
    "monitor": "services.monitor.app",
    "gateway": "services.gateway.app",
}
STOP_TIMEOUT_S = 20.0


def serve(name: str) -> int:
    """Run one service in this process until SIGTERM or Ctrl-C."""
    importlib.import_module(SERVICES[name]).main()
    return 0


class Listening(NamedTuple):
    """Where one service of the stack listens: as the start-up line says it, and its ports."""

    description: str
    ports: list[Port]


def listeners() -> dict[str, Listening]:
    """Where each service listens, from the same settings the services read (FASHION_BIND_ADDRESS and
    the per-service host and port variables)."""

    def grpc_service(name: str, settings: InferenceSettings | BatchSettings | MonitorSettings, host: str | None,
                     port: int, metrics_port: int) -> Listening:
        scheme = "https" if tls_enabled(settings) else "http"  # the metrics port serves TLS as the gRPC port does
        metrics = (f"metrics {scheme}://{settings.listen_address(host, metrics_port)}/metrics" if metrics_port > 0
                   else "metrics off")
        ports = grpc_service_ports(name, settings.listen_host(host), port, metrics_port)
        if tls_enabled(settings) and settings.health_port:  # the plaintext grpc.health.v1 port for probes
            ports.append(Port(settings.listen_host(host), settings.health_port, "FASHION_HEALTH_PORT"))
        return Listening(f"gRPC {settings.listen_address(host, port)}, {metrics}", ports)

    inference, batch = load_settings(InferenceSettings), load_settings(BatchSettings)
    monitor, gateway = load_settings(MonitorSettings), load_settings(GatewaySettings)
    web = gateway.listen_address(gateway.gateway_host, gateway.gateway_port)
    return {
        "inference": grpc_service("inference", inference, inference.inference_host, inference.inference_port,
                                  inference.inference_metrics_port),
        "batch": grpc_service("batch", batch, batch.batch_host, batch.batch_port, batch.batch_metrics_port),
        "monitor": grpc_service("monitor", monitor, monitor.monitor_host, monitor.monitor_port,
                                monitor.monitor_metrics_port),
        "gateway": Listening(f"HTTP http://{web} (/docs, /metrics)", [gateway_port(gateway)]),
    }


WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def port_clashes(where: dict[str, Listening], names: list[str]) -> list[str]:
    """One line per port that two listeners of these services would both take: two settings with the same
    value, or FASHION_HEALTH_PORT, one setting that each gRPC service reads, with TLS on."""
    claims: dict[int, list[tuple[str, str]]] = {}
    for name in names:
        for port in where[name].ports:
            if port.port > 0:
                claims.setdefault(port.port, []).append((port.host, f"{name}'s {port.setting}"))
    lines = []
    for number, claimants in claims.items():
        hosts = {host for host, _ in claimants}
        if len(claimants) > 1 and (len(hosts) == 1 or hosts & WILDCARD_HOSTS):
            lines.append(f"error: port {number} is set for {len(claimants)} listeners "
                         f"({', '.join(who for _, who in claimants)}): each needs a port of its own")
    return lines


def run_stack(only: list[str] | None = None) -> int:
    """Start the services (all, or `only` these) as child processes and supervise them; returns 1 when one
    exited on its own, 0 when stopped by a signal."""
    names = only or list(SERVICES)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        where = listeners()
    except SecurityConfigError as exc:  # e.g. a certificate without its key: each service would refuse it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if clashes := port_clashes(where, names):
        print("\n".join(clashes), file=sys.stderr)
        return 2
    # Every port first: a port another program holds stops the stack before any service starts.
    refuse_unusable_ports(load_settings(GatewaySettings), [port for name in names for port in where[name].ports])
    for name in names:
        # Own process group: the terminal's Ctrl-C reaches us once; we stop the children in order.
        procs[name] = subprocess.Popen([sys.executable, "-m", "fashion.cli", "serve", name],
                                       env=os.environ.copy(), start_new_session=True)
        print(f"fashion run: started {name} (pid {procs[name].pid}): {where[name].description}", flush=True)
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

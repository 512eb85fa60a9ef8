"""Test helpers: fixture models, free ports, service processes on real ports."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
# Child processes (services run from their own folders, the CLI, the benchmarks' load) import this
# checkout's code even when the virtual environment's editable install points at another checkout,
# as it does after a second clone that shares the environment ran `make`: tests and benchmarks
# would otherwise run that clone's code and say nothing.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "clients"), str(REPO),
                                                         os.environ.get("PYTHONPATH")]))
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def build_linear_model(folder: Path, seed: int = 0, name: str = "linear-test", version: str = "7") -> np.ndarray:
    """A real ONNX model: softmax(flatten(x) @ W + b), W and b from `seed`. Returns W|b stacked so
    tests can compute the exact expected output for any input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (784, 10)).astype(np.float32)
    b = rng.normal(0, 0.1, (10,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps({
        "name": name, "version": version, "labels": LABELS,
        "input": {"name": "image", "shape": [1, 28, 28], "layout": "NCHW"},
        "output": {"name": "probabilities", "kind": "probabilities"},
        "color_mode": "L", "normalization": {"mean": [0.5], "std": [0.5]},
        "background": "dark", "min_confidence": 0.3,
    }))
    return np.vstack([w, b[None]])


def linear_expected(wb: np.ndarray, x: np.ndarray) -> np.ndarray:
    logits = x.reshape(len(x), -1) @ wb[:-1] + wb[-1]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_top_classes(entries: list[str], probs: np.ndarray, labels: list[str]) -> None:
    """The classification extension's "score:index:label" entries are the best classes of `probs`, best
    first, each score printed with 6 decimals and equal to the reference up to float rounding (the model
    runtime and numpy may differ in the last digit)."""
    order = np.argsort(-probs)[:len(entries)]
    parsed = [entry.split(":", 2) for entry in entries]
    assert [(int(index), label) for _, index, label in parsed] == [(int(i), labels[i]) for i in order], entries
    for (score, _, _), i in zip(parsed, order, strict=True):
        assert len(score.partition(".")[2]) == 6 and abs(float(score) - probs[i]) <= 2e-6, (score, probs[i])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class ChildProcess:
    """A process of the system under test (its `proc`), its output collected in `log_path`."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (kill after `timeout`); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ServiceProcess(ChildProcess):
    """A service running as `python -m <module>` in its own process, on real ports."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    env: dict[str, str]

    def wait_serving(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.output()}")
            try:
                last = health_status(self.address, service, timeout=1.0)
                if last == "SERVING":
                    return
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.1)
        raise TimeoutError(f"{self.address} not SERVING after {timeout}s (last: {last}):\n{self.output()}")



TRAMPOLINE = Path(__file__).with_name("trampoline.py")


def changed_command(command: Sequence[str], *, unprivileged: bool = False, user: tuple[int, int] | None = None,
                    memory_limit: int | None = None, stdout_closed: bool = False) -> list[str]:
    """`command` started through tests/trampoline.py, which changes its process before exec: `unprivileged`
    drops root's right to ignore file permissions (CI runs as root), `user` is (uid, gid), `memory_limit`
    bounds its address space, `stdout_closed` closes descriptor 1; with none, `command` as it is. Never
    subprocess's preexec_fn or user= here: a child forked that way from this process, while gRPC's poller
    runs in it, may abort before exec."""
    options = [*(["--no-file-capabilities"] if unprivileged else []),
               *(["--user", f"{user[0]}:{user[1]}"] if user is not None else []),
               *(["--memory-limit", str(memory_limit)] if memory_limit is not None else []),
               *(["--close-stdout"] if stdout_closed else [])]
    if not options:
        return list(command)
    return [sys.executable, "-I", "-S", str(TRAMPOLINE), *options, "--", *command]


def start_service(module: str, workdir: Path, env: Mapping[str, str], address: str,
                  unprivileged: bool = False) -> ServiceProcess:
    """Start `python -m module` in `workdir` with FASHION_* settings from `env` (without the right to
    ignore file permissions when `unprivileged`)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASHION_LOG_STDOUT": "true", **env}
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{module.replace('.', '_')}.out"
    with open(log_path, "ab") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(changed_command([sys.executable, "-m", module], unprivileged=unprivileged),
                                cwd=workdir, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    return ServiceProcess(proc, address, log_path, full_env)


class SpanRecorder:
    """What an OTLP trace receiver got: `spans` holds (name, trace id, parent span id) of everything
    received, `span_ids` (name, trace id) -> span id, `resources` the resource attributes of each export."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.span_ids: dict[tuple[str, str], str] = {}
        self.resources: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def record(self, request: Any) -> None:
        """One ExportTraceServiceRequest."""
        with self.lock:
            for rs in request.resource_spans:
                self.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                for ss in rs.scope_spans:
                    self.spans.extend((s.name, s.trace_id.hex(), s.parent_span_id.hex()) for s in ss.spans)
                    self.span_ids.update(((s.name, s.trace_id.hex()), s.span_id.hex()) for s in ss.spans)

    def snapshot(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, done: Callable[[list[tuple[str, str, str]]], bool], timeout: float = 20.0
                 ) -> list[tuple[str, str, str]]:
        """The spans received once `done(spans)` holds, or when `timeout` passed."""
        deadline = time.monotonic() + timeout
        while not done(spans := self.snapshot()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return spans


class OtlpCollector(SpanRecorder):
    """A real OTLP/gRPC trace receiver on a free loopback port: `env` points services at it."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        super().__init__()
        collector = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector.record(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._server)
        port = free_port()
        self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        self.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
                    "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def stop(self) -> None:
        self._server.stop(0)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a zombie is dead too)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_tree(root_pid: int) -> set[int]:
    """`root_pid` and all its descendants (the Inference service's worker processes, uvicorn workers), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root_pid}
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def listening_addresses(root_pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process tree of `root_pid` listens on."""
    inodes: set[str] = set()
    for pid in process_tree(root_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(words)
            mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1 on a dual-stack socket
            found.add((str(mapped or address), int(hex_port, 16)))
    return found


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    """`server` answering in a thread of its own until the block ends, then shut down and closed."""
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def inference_stand_in(servicer: Any) -> Iterator[str]:
    """`servicer` (an InferenceService implementation of a test's own) answering on a free loopback port until
    the block ends; yields its address."""
    from fashion.v1 import inference_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


class OtlpHttpCollector(SpanRecorder):
    """A real OTLP/HTTP (protobuf) trace receiver on a free loopback port, like OtlpCollector."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        super().__init__()
        collector = self

        class Receiver(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                collector.record(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self._server.server_port}",
                    "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def stop(self) -> None:
        self._server.shutdown()

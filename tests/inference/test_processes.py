"""Several Inference server processes on one port (FASHION_INFERENCE_PROCESSES=2): real processes,
real ports; one service per test, so the checks of a run share it."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fashion.client import InferenceClient
from fashion.v1 import inference_pb2, inference_pb2_grpc
from services.inference.imaging import Preprocessor
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, alive, health_status, linear_expected, process_tree

CLASSIFY = "/fashion.v1.InferenceService/Classify"
LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ "
                  r"\[trace_id=[-0-9a-f]+\] ")


def servers(svc: ServiceProcess) -> list[int]:
    """The server processes the parent started (not their worker processes)."""
    found = []
    for pid in process_tree(svc.proc.pid) - {svc.proc.pid}:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == svc.proc.pid and stat[0] != "Z" and b"services.inference" in cmdline:
            found.append(pid)
    return sorted(found)


def run_dir(svc: ServiceProcess) -> Path:
    deadline = time.monotonic() + 30
    while not (found := re.search(r"run folder (\S+)\)", svc.output())):
        assert time.monotonic() < deadline and svc.proc.poll() is None, svc.output()
        time.sleep(0.1)
    return Path(found.group(1))


def published(folder: Path) -> dict[int, dict[str, float]]:
    out = {}
    for path in folder.glob("stats-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[int(data["pid"])] = data
    return out


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def classify_on_new_channels(svc: ServiceProcess, images: list[bytes], want: np.ndarray) -> None:
    """One call per new channel (a new connection each: the kernel picks a process for each)."""
    for i, image in enumerate(images):
        with InferenceClient(svc.address) as client:
            r = client.classify(image, top_k=10)
        probs = np.zeros(10)
        for c in r.top_k:
            probs[c.index] = c.confidence
        np.testing.assert_allclose(probs, want[i], rtol=1e-4, atol=1e-6)


def test_two_server_processes_answer_as_one_service(tmp_path: Path, linear_model) -> None:
    model_dir, wb = linear_model
    svc = start_inference(tmp_path / "run", model_dir, FASHION_INFERENCE_PROCESSES="2", FASHION_WORKER_PROCESSES="0")
    try:
        folder = run_dir(svc)
        deadline = time.monotonic() + 60
        while True:  # SERVING only once both are warm
            try:
                status = health_status(svc.address, timeout=1.0)
            except grpc.RpcError:
                status = "UNAVAILABLE"
            if status == "SERVING":
                warm = published(folder)
                assert len(warm) == 2 and all(s["ready"] for s in warm.values()), warm
                break
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.02)
        assert len(servers(svc)) == 2

        x, _ = fashion_images(40)
        images = [encode(img) for img in x]
        pre = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))
        want = linear_expected(wb, np.stack([pre(img) for img in images]))
        classify_on_new_channels(svc, images, want)
        with InferenceClient(svc.address) as client:
            stats = client.stats()
        assert stats.total_requests == 40 and stats.successful_predictions == 40, stats
        assert stats.success_rate == 100.0 and stats.average_latency_ms > 0 and stats.model_loaded
        deadline = time.monotonic() + 5  # each process rewrites its file every second
        while True:
            per_process = published(folder)
            if sum(s["total_requests"] for s in per_process.values()) == 40:
                break
            assert time.monotonic() < deadline, per_process
            time.sleep(0.1)
        assert all(s["total_requests"] > 0 for s in per_process.values()), f"calls not spread: {per_process}"

        page = urllib.request.urlopen(f"http://127.0.0.1:{svc.env['FASHION_INFERENCE_METRICS_PORT']}/metrics",
                                      timeout=10).read().decode()
        types = [line for line in page.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types)), "one set of families"
        foreign = [t for t in types if t.split()[2].startswith(("fashion_batch_", "fashion_monitor_", "fashion_http_"))]
        assert foreign == [], "only the Inference service's own families"
        assert metric(page, "fashion_grpc_requests_total", method=CLASSIFY, code="OK") == 40
        assert metric(page, "fashion_inference_images_total", outcome="success") == 40
        assert metric(page, "fashion_inference_model_loaded") == 1

        # A server process killed: the parent restarts it; what it answered stays counted.
        victim = servers(svc)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (len(now := servers(svc)) == 2 and victim not in now
                   and sum(bool(s.get("ready")) for s in published(folder).values()) == 2):
            assert time.monotonic() < deadline and svc.proc.poll() is None, svc.output()
            time.sleep(0.1)
        svc.wait_serving()
        classify_on_new_channels(svc, images[:10], want[:10])
        with InferenceClient(svc.address) as client:
            stats = client.stats()
        assert stats.total_requests == 50, stats
        page = urllib.request.urlopen(f"http://127.0.0.1:{svc.env['FASHION_INFERENCE_METRICS_PORT']}/metrics",
                                      timeout=10).read().decode()
        assert metric(page, "fashion_grpc_requests_total", method=CLASSIFY, code="OK") == 50

        # SIGTERM to the parent while a call is in flight: it is drained, then all exit.
        tree = process_tree(svc.proc.pid)
        big = [encode(np.kron(img, np.ones((36, 36), np.uint8))) for img in x[:8]] * 25
        with ThreadPoolExecutor(1) as pool, InferenceClient(svc.address) as client:
            in_flight = pool.submit(client.classify_batch, big)
            time.sleep(0.3)
            svc.proc.send_signal(signal.SIGTERM)
            resp = in_flight.result(timeout=30)
        assert len(resp.results) == 200 and all(r.category for r in resp.results), "in-flight call drained"
        code = svc.proc.wait(40)
    finally:
        svc.terminate()
    assert code == 0, svc.output()
    assert not [pid for pid in tree if alive(pid)], "a process left"
    assert not folder.exists(), "the run folder is removed"

    log = (tmp_path / "run" / "logs" / "api.log").read_text().splitlines()
    access = [line for line in log if "Service/Classify" in line and "status=OK" in line]
    assert len(access) == 50 + 1, "every access line exactly once (and the drained ClassifyBatch)"
    assert all(LINE.match(line) and line.count("[trace_id=") == 1 for line in access)
    assert all(LINE.match(line) or line.startswith((" ", "Traceback")) for line in log), "whole lines only"
    assert "exited with -9" in "\n".join(log)


def wait_published(folder: Path, done, timeout: float = 5.0) -> dict[int, dict]:  # type: ignore[no-untyped-def]
    """The processes' files once `done(files)` holds (each process rewrites its file every second)."""
    deadline = time.monotonic() + timeout
    while not done(files := published(folder)):
        assert time.monotonic() < deadline, files
        time.sleep(0.1)
    return files


def test_kserve_model_statistics_count_every_server_process(tmp_path: Path, linear_model) -> None:
    """ModelStatistics, whichever process answers it, counts the calls both processes answered."""
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")  # not fashion.kserve: tests/inference/test_kserve.py
    svc = start_inference(tmp_path / "run", linear_model[0], FASHION_INFERENCE_PROCESSES="2",
                          FASHION_WORKER_PROCESSES="0")

    def on_a_new_connection(call):  # type: ignore[no-untyped-def]
        triton = tritonclient_grpc.InferenceServerClient(svc.address)
        try:
            return call(triton)
        finally:
            triton.close()

    def infer(name: str, data: np.ndarray) -> None:
        tensor = tritonclient_grpc.InferInput(name, list(data.shape), "UINT8" if name == "image" else "BYTES")
        tensor.set_data_from_numpy(data)
        on_a_new_connection(lambda triton: triton.infer("linear-test", [tensor]))

    try:
        folder = run_dir(svc)
        svc.wait_serving()
        x, _ = fashion_images(24)
        for img in x:  # one image per call, each on a connection of its own: the kernel picks its process
            infer("image", img[None, None])
        last_call = time.time()
        for _ in range(4):
            with pytest.raises(tritonclient_grpc.InferenceServerException):
                infer("image_bytes", np.array([b"not an image"], dtype=np.object_))
        files = wait_published(folder, lambda files: sum(f["total_requests"] for f in files.values()) == 28)
        assert len(files) == 2 and all(f["total_requests"] > 0 for f in files.values()), f"calls not spread: {files}"

        for _ in range(6):  # each on a new connection: both processes answer some
            (model,) = on_a_new_connection(lambda triton: triton.get_inference_statistics("linear-test")).model_stats
            stats = model.inference_stats
            assert (stats.success.count, model.inference_count, stats.fail.count) == (24, 24, 4), model
            for part in ("queue", "compute_input", "compute_infer", "compute_output"):
                assert getattr(stats, part).count == 24 and getattr(stats, part).ns > 0, part
            assert stats.success.ns > 0 and stats.fail.ns > 0
            assert model.execution_count == 24, "one model run per call: they came one at a time"
            assert [(b.batch_size, b.compute_infer.count) for b in model.batch_stats] == [(1, 24)]
            assert model.last_inference >= int(last_call * 1000), "the latest process's last call"
    finally:
        assert svc.terminate() == 0, svc.output()


def classify_on_a_new_connection(address: str, image: bytes) -> str | None:
    """Health, then Classify, on a connection of their own and without retries: what failed, None if nothing."""
    options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"
            inference_pb2_grpc.InferenceServiceStub(channel).Classify(inference_pb2.ClassifyRequest(image=image),
                                                                       timeout=10)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return None


def test_a_restarted_server_process_takes_no_connection_before_its_model_is_warm(tmp_path: Path,
                                                                                 linear_model) -> None:
    """A server process killed: until its replacement is warm, every new connection goes to its warm
    sibling, then to either; a SIGTERM while a replacement warms up stops the service cleanly."""
    # Worker processes make the warm-up long enough that calls would meet it (they start with the model).
    svc = start_inference(tmp_path / "run", linear_model[0], FASHION_INFERENCE_PROCESSES="2",
                          FASHION_WORKER_PROCESSES="3")
    try:
        folder = run_dir(svc)
        svc.wait_serving()
        deadline = time.monotonic() + 30
        while svc.output().count("Inference service SERVING") < 2:  # each process's line, whichever answered
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.05)
        image = encode(fashion_images(1)[0][0])
        victim, survivor = servers(svc)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        # Reaped, not just a zombie: a zombie leader's threads may still hold its listening socket open.
        while Path(f"/proc/{victim}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)

        failures: list[str] = []
        calls = 0
        serving_at = None
        deadline = time.monotonic() + 90
        while serving_at is None or time.monotonic() < serving_at + 2:  # and 2 s more
            if serving_at is None and svc.output().count("Inference service SERVING") == 3:
                serving_at = time.monotonic()
            if (failure := classify_on_a_new_connection(svc.address, image)) is not None:
                failures.append(failure)
            calls += 1
            assert time.monotonic() < deadline, svc.output()
        assert not failures, f"{len(failures)} of {calls} calls failed, first: {failures[0]}"
        (replacement,) = set(servers(svc)) - {survivor}
        files = wait_published(folder, lambda files: files.get(replacement, {}).get("total_requests", 0) > 0)
        assert files[replacement]["ready"], "the replacement serves"

        # Another one killed, and SIGTERM while its replacement warms up: all stop, exit code 0.
        os.kill(replacement, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (warming := [pid for pid, f in published(folder).items()
                               if pid not in (survivor, replacement) and not f["ready"]]):
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.01)
        tree = process_tree(svc.proc.pid)
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(40)
    finally:
        svc.terminate()
    assert code == 0, svc.output()
    assert not [pid for pid in tree if alive(pid)], "a process left"
    log = (tmp_path / "run" / "logs" / "api.log").read_text()
    assert "Shutting down before it listened" in log, f"{warming} was warming up: {log}"


def test_one_process_is_the_default_here_and_has_no_parent(tmp_path: Path, linear_model) -> None:
    """FASHION_INFERENCE_PROCESSES=1 (the default on up to 2 cores): the service process itself serves."""
    svc = start_inference(tmp_path / "run", linear_model[0], FASHION_INFERENCE_PROCESSES="1",
                          FASHION_WORKER_PROCESSES="0")
    try:
        svc.wait_serving()
        assert servers(svc) == []
        with InferenceClient(svc.address) as client:
            client.classify(encode(fashion_images(1)[0][0]))
            assert client.stats().total_requests == 1
    finally:
        assert svc.terminate() == 0


@pytest.mark.parametrize(("cpus", "setting", "want"), [(1, 0, 1), (2, 0, 1), (3, 0, 3), (4, 0, 4), (16, 0, 16),
                                                       (2, 3, 3)])
def test_the_process_count_and_each_ones_share_of_the_cores(monkeypatch, cpus: int, setting: int, want: int) -> None:
    from services.common.config import InferenceSettings
    from services.inference import cpus as cpu_module

    monkeypatch.setattr(cpu_module, "machine_cpus", lambda: cpus)
    settings = InferenceSettings(inference_processes=setting)
    assert cpu_module.server_processes(settings) == want
    assert cpu_module.process_cpus(settings) == max(1, cpus // want)

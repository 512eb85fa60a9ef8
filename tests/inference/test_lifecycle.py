"""Health transitions, graceful shutdown, model loading, log rotation: each test owns a server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fashion.client import InferenceClient
from services.inference.imaging import Preprocessor
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import health_status, linear_expected

SERVICE = "fashion.v1.InferenceService"


def test_not_serving_until_model_loaded_then_serving_then_not_serving_on_sigterm(
        tmp_path: Path, linear_model) -> None:
    model_dir = tmp_path / "model-arrives-later"
    svc = start_inference(tmp_path / "run", model_dir, FASHION_WORKER_PROCESSES="2")
    try:
        deadline = time.monotonic() + 30
        while True:  # wait for the port
            try:
                status = health_status(svc.address)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, svc.output()
                time.sleep(0.1)
        assert status == "NOT_SERVING"
        assert health_status(svc.address, SERVICE) == "NOT_SERVING"
        x, _ = fashion_images(1)
        with InferenceClient(svc.address) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.classify(encode(x[0]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model" in err.value.details()
            assert client.stats().model_loaded is False

        shutil.copytree(linear_model[0], model_dir)  # the model appears: the service picks it up
        svc.wait_serving(timeout=60)
        assert health_status(svc.address, SERVICE) == "SERVING"

        # Watch the health while a slow call is in flight, then SIGTERM.
        channel = grpc.insecure_channel(svc.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        statuses: list[str] = []

        def follow() -> None:
            try:
                for msg in watch:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status))
            except grpc.RpcError:
                pass

        workers = children(svc.proc.pid)
        assert len(workers) == 2, "image decoding worker processes"
        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        big = [encode(np.kron(img, np.ones((36, 36), np.uint8))) for img in fashion_images(8)[0]] * 25
        with ThreadPoolExecutor(1) as pool, InferenceClient(svc.address) as client:
            in_flight = pool.submit(client.classify_batch, big)
            time.sleep(0.3)
            svc.proc.send_signal(signal.SIGTERM)
            resp = in_flight.result(timeout=30)
        assert len(resp.results) == 200 and all(r.category for r in resp.results), "in-flight call drained"
        assert svc.proc.wait(30) == 0
        follower.join(10)
        channel.close()
        assert statuses[0] == "SERVING" and "NOT_SERVING" in statuses, statuses
        assert "Shutting down" in svc.output()
        assert not [p for p in workers if Path(f"/proc/{p}").exists()], "workers exit with the service"
    finally:
        svc.kill()


def children(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_crashed_decoding_worker_is_replaced_while_serving(tmp_path: Path, linear_model) -> None:
    svc = start_inference(tmp_path / "run", linear_model[0], FASHION_WORKER_PROCESSES="2")
    try:
        svc.wait_serving()
        x, _ = fashion_images(16)
        images = [encode(img) for img in x]
        with InferenceClient(svc.address) as client:
            before = [r.category for r in client.classify_batch(images).results]
            for pid in children(svc.proc.pid):
                os.kill(pid, signal.SIGKILL)
            for _ in range(2):  # each batch takes the next worker: both dead ones are met and replaced
                after = [r.category for r in client.classify_batch(images).results]
                assert after == before and all(after)
            assert client.classify(images[0]).category == before[0]
        assert len(children(svc.proc.pid)) == 2
        assert "died" in (tmp_path / "run" / "logs" / "api_errors.log").read_text()
        assert health_status(svc.address, SERVICE) == "SERVING"
    finally:
        svc.terminate()


def test_bad_model_folder_keeps_not_serving_and_says_why(tmp_path: Path) -> None:
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "manifest.json").write_text("{not json")
    svc = start_inference(tmp_path / "run", model_dir)
    try:
        time.sleep(2)
        assert health_status(svc.address) == "NOT_SERVING"
        with InferenceClient(svc.address) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.classify(b"x")
            stats = client.stats()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not valid JSON" in err.value.details()
        assert not stats.model_loaded and "not valid JSON" in stats.model_error
        assert "Model load failed" in (tmp_path / "run" / "logs" / "api_errors.log").read_text()
        (tmp_path / "shoe.png").write_bytes(encode(fashion_images(1)[0][0]))
        command = subprocess.run([sys.executable, "-m", "fashion.cli", "classify", str(tmp_path / "shoe.png"),
                                  "--address", svc.address], capture_output=True, text=True, timeout=60)
        # It asked "is it running?" of a service that runs: the operator looked for a stopped process.
        assert command.returncode == 2 and "not valid JSON" in command.stderr, command.stderr
        assert f"the Inference service at {svc.address} runs but is NOT_SERVING" in command.stderr, command.stderr
        assert "is it running" not in command.stderr
    finally:
        svc.terminate()


def test_logs_are_written_and_rotated(tmp_path: Path, linear_model) -> None:
    svc = start_inference(tmp_path / "run", linear_model[0], FASHION_LOG_MAX_BYTES="3000",
                          FASHION_LOG_BACKUP_COUNT="2")
    try:
        svc.wait_serving()
        x, _ = fashion_images(1)
        with InferenceClient(svc.address) as client:
            for _ in range(80):
                client.classify(encode(x[0]))
            for _ in range(30):
                with pytest.raises(grpc.RpcError):
                    client.classify(b"bad")
    finally:
        assert svc.terminate() == 0
    logs = tmp_path / "run" / "logs"
    names = sorted(p.name for p in logs.iterdir())
    assert {"api.log", "api.log.1", "api.log.2", "api_errors.log", "api_errors.log.1"} <= set(names), names
    assert "api.log.3" not in names, "only backup_count backups are kept"
    assert all((logs / n).stat().st_size <= 3000 + 400 for n in names)
    assert "status=INVALID_ARGUMENT" in (logs / "api_errors.log").read_text()


@pytest.mark.parametrize("setting", [
    # the default on one core: no workers, the engine thread decodes and runs the model
    {"FASHION_WORKER_PROCESSES": "0"},
    # what CUDA runs: workers that only decode, the model in the service process
    {"FASHION_WORKER_PROCESSES": "2", "FASHION_WORKERS_RUN_MODEL": "false"},
], ids=["no workers", "workers only decode"])
def test_other_decoding_settings_give_the_same_answers(tmp_path: Path, linear_model, inference_server,
                                                       setting: dict[str, str]) -> None:
    svc = start_inference(tmp_path / "run", linear_model[0], **setting)
    try:
        svc.wait_serving()
        assert len(children(svc.proc.pid)) == int(setting["FASHION_WORKER_PROCESSES"])
        x, _ = fashion_images(16)
        images = [encode(img) for img in x] + [b"not an image"]
        with InferenceClient(svc.address) as here, InferenceClient(inference_server.address) as pooled:
            a, b = here.classify_batch(images).results, pooled.classify_batch(images).results
            lone = here.classify(images[3])
        assert [(r.category, round(r.confidence, 5), r.error.message) for r in a] == \
               [(r.category, round(r.confidence, 5), r.error.message) for r in b]
        assert "not an image" in a[-1].error.message and all(r.category for r in a[:-1])
        assert (lone.category, round(lone.confidence, 5)) == (a[3].category, round(a[3].confidence, 5))
    finally:
        svc.terminate()
    log = (tmp_path / "run" / "logs" / "api.log").read_text()
    assert "running the model" not in log


def test_workers_running_the_model_answer_exactly_as_the_model(tmp_path: Path, linear_model) -> None:
    """On the CPU the decoding workers run the model on every batch: each image still gets the
    model's own probabilities, in its place, and a bad image fails alone."""
    model_dir, wb = linear_model
    svc = start_inference(tmp_path / "run", model_dir, FASHION_WORKER_PROCESSES="2")
    try:
        svc.wait_serving()
        x, _ = fashion_images(40)
        images = [encode(img) for img in x]
        bad = {5: b"not an image", 23: b"", 31: encode(x[31])[:50]}
        sent = [bad.get(i, img) for i, img in enumerate(images)]
        pre = Preprocessor(28, 28, mean=(0.5,), std=(0.5,))
        want = linear_expected(wb, np.stack([pre(img) for img in images]))
        with InferenceClient(svc.address) as client:
            results = client.classify_batch(sent, top_k=10).results
        assert len(results) == 40
        for i, r in enumerate(results):
            if i in bad:
                assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not r.category
                continue
            probs = np.zeros(10)
            for c in r.top_k:
                probs[c.index] = c.confidence
            np.testing.assert_allclose(probs, want[i], rtol=1e-4, atol=1e-6)
    finally:
        svc.terminate()
    assert "and running the model" in (tmp_path / "run" / "logs" / "api.log").read_text()

"""Health transitions, graceful shutdown, model loading, log rotation: each test owns a server."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fashion.client import InferenceClient
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import health_status

SERVICE = "fashion.v1.InferenceService"


def test_not_serving_until_model_loaded_then_serving_then_not_serving_on_sigterm(
        tmp_path: Path, linear_model) -> None:
    model_dir = tmp_path / "model-arrives-later"
    svc = start_inference(tmp_path / "run", model_dir)
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
    finally:
        svc.kill()


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
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not valid JSON" in err.value.details()
        assert "Model load failed" in (tmp_path / "run" / "logs" / "api_errors.log").read_text()
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

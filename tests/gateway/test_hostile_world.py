"""The gateway when the world treats it badly: its worker processes killed with requests in flight."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.support import alive, process_tree


@pytest.fixture
def silent_inference() -> Iterator[str]:
    """The address of an "Inference service" that takes connections and never answers: calls to it stay
    in flight until the gateway's deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def take() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=take, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def uvicorn_workers(supervisor: int) -> set[int]:
    """The gateway's worker processes (multiprocessing's spawned children, not its resource tracker)."""
    return {pid for pid in process_tree(supervisor) - {supervisor}
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def in_flight(scrape: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
               if line.startswith("fashion_http_requests_in_flight "))


def test_requests_of_a_killed_worker_leave_the_in_flight_gauge(tmp_path: Path, silent_inference: str) -> None:
    """Gateway workers SIGKILLed with requests in flight are replaced by uvicorn; /metrics, whichever worker
    answers, must not count the dead workers' requests as in flight for good."""
    gateway = start_gateway(tmp_path / "gateway", silent_inference, FASHION_GATEWAY_WORKERS="2",
                            FASHION_GATEWAY_TIMEOUT_S="20")
    try:
        gateway.wait_ready()
        image = encode(fashion_images(1)[0][0])
        answers: list[object] = []

        def predict() -> None:
            try:
                answers.append(httpx.post(f"{gateway.url}/predict", files={"file": ("a.png", image, "image/png")},
                                          timeout=30).status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

        callers = [threading.Thread(target=predict) for _ in range(6)]
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 10
        while (n := in_flight(httpx.get(f"{gateway.url}/metrics", timeout=5).text)) < 7:  # 6 + the scrape itself
            assert time.monotonic() < deadline, f"{n} requests in flight"
            time.sleep(0.1)
        old = uvicorn_workers(gateway.proc.pid)
        assert len(old) == 2
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        for caller in callers:
            caller.join(30)
        assert answers == ["RemoteProtocolError"] * 6, answers  # their connections closed: no wrong answer
        deadline = time.monotonic() + 30
        while len(new := uvicorn_workers(gateway.proc.pid)) < 2 or any(pid in old and alive(pid) for pid in new):
            assert time.monotonic() < deadline, "uvicorn did not replace its workers"
            time.sleep(0.1)
        gateway.wait_ready()
        for _ in range(4):  # new connections: either worker answers
            assert in_flight(httpx.get(f"{gateway.url}/metrics", timeout=5).text) == 1.0  # the scrape itself
    finally:
        gateway.terminate()

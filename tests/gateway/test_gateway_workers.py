"""Several gateway workers (FASHION_GATEWAY_WORKERS) are one gateway to Prometheus: whichever worker
answers /metrics, it counts every worker's requests."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, process_tree

CALLS = 24


def _predict_count(text: str) -> float:
    """fashion_http_requests_total of POST /predict answered 200, from a scrape."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("fashion_http_requests_total{") and 'route="/predict"' in line and \
                'status="200"' in line and 'method="POST"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_workers_share_one_metrics_view(tmp_path: Path, inference_server: ServiceProcess) -> None:
    gateway = start_gateway(tmp_path / "gateway", inference_server.address, FASHION_GATEWAY_WORKERS="2")
    try:
        gateway.wait_ready()
        assert len(process_tree(gateway.proc.pid)) >= 3, "a supervisor and two workers"
        x, _ = fashion_images(1)
        image = encode(x[0])
        for _ in range(CALLS):  # a new connection each: the kernel spreads them over the workers
            with httpx.Client(base_url=gateway.url, timeout=10) as client:
                assert client.post("/predict", files={"file": ("item.png", image, "image/png")}).status_code == 200
        scrapes = []
        for _ in range(6):
            with httpx.Client(base_url=gateway.url, timeout=10) as client:
                scrapes.append(client.get("/metrics").text)
    finally:
        gateway.terminate()
    assert [_predict_count(text) for text in scrapes] == [float(CALLS)] * len(scrapes)
    families = [line for line in scrapes[0].splitlines() if line.startswith("# TYPE fashion_http_requests_total")]
    assert len(families) == 1
    assert not re.search(r'pid="\d+"', scrapes[0]), "summed, not one series per worker"
    owners = {line.split()[2].split("_")[1] for line in scrapes[0].splitlines() if line.startswith("# TYPE ")}
    assert owners == {"http"}, "only the gateway's own families"

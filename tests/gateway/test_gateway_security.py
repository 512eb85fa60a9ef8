"""The gateway with HTTPS (client certificates required) and the bearer token, in front of an
Inference service that requires mTLS and the same token: one set of variables configures both."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_inference
from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.security.pki import make_pki
from tests.security.test_grpc_security import TOKEN, assert_secret_absent
from tests.support import ServiceProcess, free_port


def test_https_mtls_and_token(tmp_path: Path, linear_model) -> None:
    pki = make_pki(tmp_path / "pki")
    shared = {"FASHION_TLS": "true", "FASHION_TLS_CA": str(pki.ca), "FASHION_TLS_CERT": str(pki.server_cert),
              "FASHION_TLS_KEY": str(pki.server_key), "FASHION_TLS_CLIENT_CA": str(pki.ca),
              "FASHION_AUTH_TOKEN": TOKEN}
    health_port = free_port()
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_HEALTH_PORT=str(health_port),
                                **shared)
    gw = start_gateway(tmp_path / "gateway", inference.address, scheme="https", **shared)
    with_cert = ssl.create_default_context(cafile=str(pki.ca))
    with_cert.load_cert_chain(pki.client_cert, pki.client_key)
    client_kw = {"verify": with_cert}
    try:
        ServiceProcess(inference.proc, f"127.0.0.1:{health_port}", inference.log_path, {}).wait_serving()
        gw.wait_ready(**client_kw)
        x, _ = fashion_images(1)
        files = {"file": ("item.png", encode(x[0]))}
        with httpx.Client(base_url=gw.url, timeout=30, **client_kw) as client:  # type: ignore[arg-type]
            # Health and the API description need no token; metrics do (FASHION_METRICS_PUBLIC=false).
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
            assert client.get("/metrics").status_code == 401
            metrics = client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
            assert metrics.status_code == 200 and "fashion_http_requests" in metrics.text
            doc = client.get("/openapi.json").json()
            assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
            # The docs page loads everything it needs from the gateway (no CDN: offline machines, and no
            # third-party script in a page where users type the token), without a token.
            page = client.get("/docs")
            assert page.status_code == 200 and "SwaggerUIBundle" in page.text
            assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
            assert len(assets) == 3 and all(a.startswith("/docs/assets/") for a in assets), assets
            assert "://" not in page.text.replace("window.location.origin", "")
            for asset in assets:
                got = client.get(asset)
                assert got.status_code == 200 and len(got.content) > 1000, (asset, got.status_code)
            for headers, reason in (({}, "missing bearer token"), ({"authorization": "Bearer nope"}, "invalid"),
                                    ({"authorization": TOKEN}, "invalid")):
                resp = client.post("/predict", files=files, headers=headers)
                assert resp.status_code == 401, resp.text
                assert resp.headers["www-authenticate"] == "Bearer"
                assert resp.json()["error"]["code"] == "UNAUTHENTICATED"
                assert reason in resp.json()["error"]["message"]
                assert client.get("/stats", headers=headers).status_code == 401
                assert client.post("/batch/jobs", json={"input_dir": "inbox"}, headers=headers).status_code == 401
            auth = {"authorization": f"Bearer {TOKEN}"}
            resp = client.post("/predict", files=files, headers=auth)
            assert resp.status_code == 200, resp.text
            assert resp.json()["category"]
            assert client.get("/stats", headers=auth).json()["total_requests"] >= 1
        # The Monitor's check of the gateway speaks its HTTPS with the same variables (it asked plain HTTP, and
        # with TLS on it reported the API down): `fashion monitor health`, run as the Monitor runs it.
        shared_client = {**shared, "FASHION_TLS_CERT": str(pki.client_cert), "FASHION_TLS_KEY": str(pki.client_key)}

        def monitor_health(**env: str) -> dict[str, dict[str, str]]:
            health = subprocess.run(
                [sys.executable, "-m", "fashion.cli", "monitor", "health", "--embedded", "--json"], cwd=tmp_path,
                capture_output=True, text=True, timeout=120,
                env={**os.environ, **shared_client, "FASHION_INFERENCE_ADDRESS": inference.address,
                     "FASHION_BATCH_ADDRESS": f"127.0.0.1:{free_port()}", "OTEL_SDK_DISABLED": "true",
                     "FASHION_GATEWAY_ADDRESS": gw.url.removeprefix("https://"),
                     "FASHION_MONITOR_STATE_DB": str(tmp_path / "monitor.db"), **env})
            return {s["name"]: s for s in json.loads(health.stdout)["system"]["services"]}

        services = monitor_health()
        assert services["gateway"]["status"] == "healthy", services["gateway"]
        assert services["gateway"]["serving_status"] == "HTTP 200 healthy"
        assert services["inference"]["status"] == "healthy", services["inference"]
        # FASHION_TLS_SERVER_NAME is the name the gateway's certificate must hold, as for the gRPC calls.
        assert monitor_health(FASHION_TLS_SERVER_NAME="localhost")["gateway"]["status"] == "healthy"
        elsewhere = monitor_health(FASHION_TLS_SERVER_NAME="elsewhere.example")["gateway"]
        assert elsewhere["status"] == "unhealthy" and "elsewhere.example" in elsewhere["message"], elsewhere
        # Without a client certificate the TLS handshake fails; plaintext HTTP is not served.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{gw.url}/healthz", verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=10)
        with pytest.raises(httpx.HTTPError):
            httpx.get(gw.url.replace("https://", "http://") + "/healthz", timeout=10)
    finally:
        code = gw.terminate()
        inference.terminate()
    assert code == 0, gw.output()
    assert_secret_absent(tmp_path / "gateway", TOKEN)
    assert_secret_absent(tmp_path / "inference", TOKEN)

"""The metrics ports with TLS on: HTTPS with the gRPC port's certificate (client certificates required
with FASHION_TLS_CLIENT_CA), the token still required, a renewed certificate served from the next
connection, and a client that never completes its handshake holding up no other scrape. Real service
processes on real ports. Without TLS they stay plain HTTP: test_grpc_security.py
test_metrics_need_the_token_unless_made_public."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from services.common.metrics import TLS_HANDSHAKE_TIMEOUT_S
from tests.conftest import start_inference
from tests.security.pki import Pki, make_pki, mount_version, renew_carelessly, renew_server_certificate
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(180)
TOKEN = "metrics-tok-5d2e9a71c4"
FAMILY = "fashion_inference_model_loaded"


def client_context(pki: Pki, certificate: bool = True) -> ssl.SSLContext:
    """What Prometheus scrapes with: the CA, and (mTLS) a client certificate of it."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def scrape(port: int, context: ssl.SSLContext, token: str | None = TOKEN, timeout: float = 10) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"https://127.0.0.1:{port}/metrics", verify=context, headers=headers, timeout=timeout)


def served(port: int, pki: Pki) -> tuple[int, int]:
    """The serial number of the certificate a new HTTPS connection to `port` is shown, and the status of a
    scrape over that same connection."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(pki), timeout=10)
    try:
        connection.connect()
        assert isinstance(connection.sock, ssl.SSLSocket)
        der = connection.sock.getpeercert(binary_form=True)
        assert der is not None
        connection.request("GET", "/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status != 200 or FAMILY in body, body[:300]
        return x509.load_der_x509_certificate(der).serial_number, response.status
    finally:
        connection.close()


def start_tls_inference(workdir: Path, model_dir: Path, cert: Path, key: Path, pki: Pki, **extra: str
                        ) -> tuple[ServiceProcess, int]:
    """An Inference service with mutual TLS and the token, SERVING (probed on its plaintext health
    port); and its metrics port."""
    health_port = free_port()
    svc = start_inference(workdir, model_dir, FASHION_TLS_CERT=str(cert), FASHION_TLS_KEY=str(key),
                          FASHION_TLS_CLIENT_CA=str(pki.ca), FASHION_AUTH_TOKEN=TOKEN,
                          FASHION_HEALTH_PORT=str(health_port), **extra)
    try:
        ServiceProcess(svc.proc, f"127.0.0.1:{health_port}", svc.log_path, svc.env).wait_serving()
    except BaseException:
        svc.terminate()
        raise
    return svc, int(svc.env["FASHION_INFERENCE_METRICS_PORT"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_service(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
                 linear_model) -> Iterator[tuple[ServiceProcess, int]]:
    svc, port = start_tls_inference(tmp_path_factory.mktemp("mtls"), linear_model[0], pki.server_cert,
                                    pki.server_key, pki)
    try:
        yield svc, port
    finally:
        svc.terminate()


def logged(svc: ServiceProcess, text: str, timeout: float = 10) -> str:
    """The service's output once it holds `text` (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while text not in (output := svc.output()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return output


def problems_logged(svc: ServiceProcess) -> list[str]:
    return [line for line in svc.output().splitlines() if "ERROR" in line or "Traceback" in line]


def test_metrics_are_https_only_with_client_certificate_and_token(mtls_service: tuple[ServiceProcess, int],
                                                                  pki: Pki) -> None:
    svc, port = mtls_service
    # Plain HTTP, the token in cleartext: no answer at all (the TLS handshake fails), never metrics.
    for headers in ({"authorization": f"Bearer {TOKEN}"}, {}):
        with pytest.raises(httpx.TransportError):
            plain = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)
            pytest.fail(f"plain HTTP answered {plain.status_code}: {plain.text[:200]}")
    # HTTPS without a client certificate, or with one of another CA: the handshake is refused.
    with pytest.raises(httpx.TransportError):
        scrape(port, client_context(pki, certificate=False))
    rogue = client_context(pki, certificate=False)
    rogue.load_cert_chain(pki.rogue_cert, pki.rogue_key)
    with pytest.raises(httpx.TransportError):
        scrape(port, rogue)
    # The client certificate but no token, or a wrong one: 401, as without TLS.
    for token in (None, "wrong"):
        refused = scrape(port, client_context(pki), token=token)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED", refused.text
    # Everything: the Prometheus text.
    ok = scrape(port, client_context(pki))
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"].startswith("text/plain") and FAMILY in ok.text
    # The refused handshakes are not errors of the service: nothing logged above DEBUG, still serving.
    assert not problems_logged(svc), problems_logged(svc)
    assert svc.proc.poll() is None
    started = f"Prometheus metrics on https://127.0.0.1:{port}/metrics (client certificate and bearer token required)"
    assert started in logged(svc, started)


def test_a_client_that_never_completes_its_handshake_holds_up_no_scrape(mtls_service: tuple[ServiceProcess, int],
                                                                        pki: Pki) -> None:
    svc, port = mtls_service
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    try:
        time.sleep(0.3)  # accepted by now: a handshake in the accepting thread would wait on them
        started = time.monotonic()
        ok = scrape(port, client_context(pki), timeout=TLS_HANDSHAKE_TIMEOUT_S / 2)
        assert ok.status_code == 200 and FAMILY in ok.text
        assert time.monotonic() - started < TLS_HANDSHAKE_TIMEOUT_S / 2
        # The silent clients are dropped once the handshake timeout has passed, not kept for ever.
        for sock in silent:
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < TLS_HANDSHAKE_TIMEOUT_S * 2
    finally:
        for sock in silent:
            sock.close()
    assert scrape(port, client_context(pki)).status_code == 200
    assert not problems_logged(svc), problems_logged(svc)


def test_a_renewed_certificate_reaches_new_metrics_connections_without_a_restart(tmp_path: Path, pki: Pki,
                                                                                 linear_model) -> None:
    """The files change as a Kubernetes Secret volume changes them (a new folder, then one rename of the
    link to it), after a careless renewal that is not used (the new key beside the old certificate)."""
    mount = tmp_path / "mount"
    *_, first_serial = renew_server_certificate(pki, mount / "v1")
    (mount / "current").symlink_to("v1")
    svc, port = start_tls_inference(tmp_path / "inference", linear_model[0], mount / "current" / "tls.crt",
                                    mount / "current" / "tls.key", pki)
    try:
        assert served(port, pki) == (first_serial, 200)
        second_serial = renew_carelessly(pki, mount)
        for _ in range(3):
            assert served(port, pki) == (first_serial, 200)
        mount_version(mount, "v2")
        assert served(port, pki) == (second_serial, 200)  # the very next connection
        with pytest.raises(httpx.TransportError):  # client certificates still required
            scrape(port, client_context(pki, certificate=False))
        assert svc.proc.poll() is None  # no restart
        output = logged(svc, "new metrics connections get the new certificate")
        assert "new metrics connections get the new certificate" in output
        assert output.count("Keeping the current TLS certificate of the metrics port until the files agree") == 1, \
            output  # once, not at each of the connections meanwhile
    finally:
        svc.terminate()


def test_the_inference_parent_of_several_processes_serves_its_metrics_over_tls(tmp_path: Path, pki: Pki,
                                                                                linear_model) -> None:
    """FASHION_INFERENCE_PROCESSES=2: the parent serves the summed metrics on the one port, HTTPS as well."""
    svc, port = start_tls_inference(tmp_path / "inference", linear_model[0], pki.server_cert, pki.server_key, pki,
                                    FASHION_INFERENCE_PROCESSES="2", FASHION_WORKER_PROCESSES="0")
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
        with pytest.raises(httpx.TransportError):
            scrape(port, client_context(pki, certificate=False))
        ok = scrape(port, client_context(pki))
        assert ok.status_code == 200 and FAMILY in ok.text, ok.text
        assert scrape(port, client_context(pki), token=None).status_code == 401
        started = f"Prometheus metrics on https://127.0.0.1:{port}/metrics (client certificate and bearer token"
        assert started in logged(svc, started)
    finally:
        svc.terminate()

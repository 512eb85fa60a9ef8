"""Bearer token and TLS on the gRPC services, through real channels to a service in its own process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fashion.client import ChannelOptions, InferenceClient
from fashion.v1 import inference_pb2 as pb
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.security.pki import make_pki
from tests.support import ServiceProcess, free_port, health_status

TOKEN = "tok-8f3a1c9e5b7d-never-logged"


def image() -> bytes:
    x, _ = fashion_images(1)
    return encode(x[0])


def assert_secret_absent(folder: Path, secret: str) -> None:
    """No file the service wrote (logs, stdout) contains the secret."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files), files
    for path in files:
        assert secret.encode() not in path.read_bytes(), f"secret written to {path}"


@pytest.fixture(scope="module")
def token_service(tmp_path_factory: pytest.TempPathFactory, linear_model) -> ServiceProcess:
    svc = start_inference(tmp_path_factory.mktemp("token"), linear_model[0], FASHION_AUTH_TOKEN=TOKEN)
    try:
        svc.wait_serving()
        yield svc
    finally:
        svc.terminate()


def test_calls_without_the_token_are_refused_and_calls_with_it_served(token_service: ServiceProcess) -> None:
    img = image()
    for token, reason in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        with InferenceClient(ChannelOptions(token_service.address, token=token, retries=1)) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.classify(img)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(client.classify_stream([pb.ClassifyRequest(image=img, request_id="a")]))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                client.stats()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A malformed header (no "Bearer" scheme) is refused too.
    with grpc.insecure_channel(token_service.address) as ch:
        stub = ch.unary_unary("/fashion.v1.InferenceService/Classify", pb.ClassifyRequest.SerializeToString,
                              pb.ClassifyResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            stub(pb.ClassifyRequest(image=img), metadata=[("authorization", TOKEN)], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with InferenceClient(ChannelOptions(token_service.address, token=TOKEN)) as client:
        assert client.classify(img).category
        responses = list(client.classify_stream([pb.ClassifyRequest(image=img, request_id=str(i)) for i in range(3)]))
        assert [r.request_id for r in responses] == ["0", "1", "2"]
        assert client.stats().total_requests >= 2


def test_health_and_reflection_need_no_token(token_service: ServiceProcess) -> None:
    assert health_status(token_service.address) == "SERVING"
    with grpc.insecure_channel(token_service.address) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "fashion.v1.InferenceService" in services


def test_metrics_need_the_token_unless_made_public(token_service: ServiceProcess, tmp_path: Path,
                                                   linear_model) -> None:
    url = f"http://127.0.0.1:{token_service.env['FASHION_INFERENCE_METRICS_PORT']}/metrics"
    for headers in ({}, {"authorization": "Bearer wrong"}):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED", refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
    scraped = httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200 and "fashion_inference_model_loaded" in scraped.text
    public = start_inference(tmp_path, linear_model[0], FASHION_AUTH_TOKEN=TOKEN, FASHION_METRICS_PUBLIC="true",
                             FASHION_REFLECTION="false")
    try:
        public.wait_serving()
        assert httpx.get(f"http://127.0.0.1:{public.env['FASHION_INFERENCE_METRICS_PORT']}/metrics").status_code == 200
        # Reflection turned off: grpcurl-style listing is UNIMPLEMENTED, health still answers.
        with grpc.insecure_channel(public.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert health_status(public.address) == "SERVING"
    finally:
        public.terminate()


def test_refusals_are_logged_without_the_token(token_service: ServiceProcess) -> None:
    with InferenceClient(ChannelOptions(token_service.address, token=TOKEN + "x", retries=1)) as client:
        with pytest.raises(grpc.RpcError):
            client.classify(image())
    log = Path(token_service.env.get("FASHION_LOG_DIR", token_service.log_path.parent / "logs"))
    deadline = time.monotonic() + 10
    while "UNAUTHENTICATED" not in (log / "api_errors.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "status=UNAUTHENTICATED" in (log / "api_errors.log").read_text()
    assert_secret_absent(token_service.log_path.parent, TOKEN)


def test_token_file_is_read_and_rotation_is_picked_up(tmp_path: Path, linear_model) -> None:
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_text("first-token\n")
    svc = start_inference(tmp_path / "svc", linear_model[0], FASHION_AUTH_TOKEN_FILE=str(token_file))
    try:
        svc.wait_serving()
        img = image()
        with InferenceClient(ChannelOptions(svc.address, token="first-token")) as client:
            assert client.classify(img).category
        # Kubernetes swaps a mounted Secret's file; the service follows without a restart.
        token_file.write_text("second-token\n")
        deadline = time.monotonic() + 30
        with InferenceClient(ChannelOptions(svc.address, token="second-token", retries=1)) as client:
            while True:
                try:
                    assert client.classify(img).category
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert time.monotonic() < deadline, "the rotated token was never accepted"
                    time.sleep(0.5)
        with InferenceClient(ChannelOptions(svc.address, token="first-token", retries=1)) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.classify(img)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert_secret_absent(tmp_path / "svc", "second-token")
    finally:
        svc.terminate()


def test_mutual_tls_with_token(tmp_path: Path, linear_model) -> None:
    pki = make_pki(tmp_path / "pki")
    health_port = free_port()
    svc = start_inference(tmp_path / "svc", linear_model[0], FASHION_TLS_CERT=str(pki.server_cert),
                          FASHION_TLS_KEY=str(pki.server_key), FASHION_TLS_CLIENT_CA=str(pki.ca),
                          FASHION_AUTH_TOKEN=TOKEN, FASHION_HEALTH_PORT=str(health_port))
    try:
        # Kubernetes-style probe: plaintext grpc.health.v1 on the health port.
        ServiceProcess(svc.proc, f"127.0.0.1:{health_port}", svc.log_path, svc.env).wait_serving()
        img = image()
        good = ChannelOptions(svc.address, root_ca=pki.ca, client_cert=pki.client_cert,
                              client_key=pki.client_key, token=TOKEN, retries=1, timeout_s=10)
        with InferenceClient(good) as client:
            r = client.classify(img)
            assert r.category and r.top_k
            assert client.health() == "SERVING"

        refused = {
            "no client certificate": ChannelOptions(svc.address, root_ca=pki.ca, token=TOKEN, retries=1, timeout_s=5),
            "certificate from another CA": ChannelOptions(svc.address, root_ca=pki.ca, client_cert=pki.rogue_cert,
                                                          client_key=pki.rogue_key, token=TOKEN, retries=1,
                                                          timeout_s=5),
            "plaintext": ChannelOptions(svc.address, token=TOKEN, retries=1, timeout_s=5),
        }
        for what, options in refused.items():
            with InferenceClient(options) as client, pytest.raises(grpc.RpcError) as err:
                client.classify(img)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what

        # TLS but no token: the channel is fine, the call is not.
        with InferenceClient(ChannelOptions(**{**good.__dict__, "token": None})) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.classify(img)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # The CLI, as a user runs it, configured by the same environment variables as the services.
        png = tmp_path / "item.png"
        png.write_bytes(img)
        env = {k: v for k, v in svc.env.items() if not k.startswith("FASHION_")}
        env.update(FASHION_TLS_CA=str(pki.ca), FASHION_TLS_CERT=str(pki.client_cert),
                   FASHION_TLS_KEY=str(pki.client_key))
        cli = [sys.executable, "-m", "fashion.cli", "classify", "--json", "--address", svc.address, str(png)]
        ok = subprocess.run(cli, env={**env, "FASHION_AUTH_TOKEN": TOKEN}, capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert '"category"' in ok.stdout
        refused_cli = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
        assert refused_cli.returncode == 2
        assert "UNAUTHENTICATED" in refused_cli.stderr
        assert TOKEN not in refused_cli.stderr + ok.stderr
    finally:
        svc.terminate()
    assert_secret_absent(tmp_path / "svc", TOKEN)

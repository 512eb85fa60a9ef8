"""Secrets rotated under load. Tokens: one token file shared by the Inference service, the Batch service and
the gateway (as one mounted Secret would be) is rewritten in the documented three steps while a
batch job of thousands of images runs and a client keeps calling the gateway and the Inference
service; nothing may fail, and afterwards the old token is refused everywhere. Certificates: a
renewed certificate reaches the next connection, no restart, no failed call."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from fashion.client import BatchClient, ChannelOptions, InferenceClient, TokenFile, TokenFileError
from fashion.client._token import RECHECK_S
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import BatchHome, wait_for, write_images
from tests.conftest import start_inference
from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images
from tests.security.pki import make_pki, mount_version, renew_carelessly, renew_server_certificate
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(300)
OLD, NEW = "old-token-3f9c0d", "new-token-7a1e52"
IMAGES = 3000
ENDED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def replace(path: Path, text: str) -> None:
    """As a Secret update does: the new file appears whole (write, then rename over the old)."""
    staging = path.with_name(f".{path.name}.new")
    staging.write_text(text)
    os.replace(staging, path)


class SteadyLoad:
    """A client calling the gateway's /predict and the Inference service's Classify in a loop, with the
    token it reads from the file before each call (the first line), as a rotated client would."""

    def __init__(self, gateway_url: str, inference_address: str, token_file: Path) -> None:
        self.gateway_url, self.inference_address, self.token_file = gateway_url, inference_address, token_file
        self.image = encode(fashion_images(1)[0][0])
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        options = ChannelOptions(self.inference_address, token_file=self.token_file, retries=1)
        with httpx.Client(base_url=self.gateway_url, timeout=30) as http, InferenceClient(options) as grpc_client:
            while not self._stop.is_set():
                token = self.token_file.read_text().split()[0]
                resp = http.post("/predict", files={"file": ("a.png", self.image)},
                                 headers={"authorization": f"Bearer {token}"})
                if resp.status_code != 200:
                    self.failures.append(f"gateway {resp.status_code}: {resp.text}")
                try:
                    grpc_client.classify(self.image)
                except grpc.RpcError as exc:
                    self.failures.append(f"Classify {exc.code().name}: {exc.details()}")
                else:
                    self.ok += 1


def test_rotating_the_token_under_load_fails_no_image_and_no_call(tmp_path: Path, linear_model) -> None:
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_text(f"{OLD}\n")
    shared = {"FASHION_AUTH_TOKEN_FILE": str(token_file)}
    home = BatchHome(tmp_path / "batch")
    write_images(home.data / "inbox", IMAGES)
    inference = start_inference(tmp_path / "inference", linear_model[0], **shared)
    batch = gateway = None
    try:
        inference.wait_serving()
        batch = home.start(inference.address, FASHION_BATCH_CHUNK_SIZE="4", FASHION_BATCH_IN_FLIGHT="1", **shared)
        gateway = start_gateway(tmp_path / "gateway", inference.address, **shared)
        gateway.wait_ready()
        with BatchClient(ChannelOptions(batch.address, token_file=token_file)) as client, \
                SteadyLoad(gateway.url, inference.address, token_file) as load:
            job = client.submit("inbox")
            steps = [(IMAGES // 4, f"{OLD}\n{NEW}\n"), (IMAGES // 2, f"{NEW}\n{OLD}\n"), (3 * IMAGES // 4, f"{NEW}\n")]
            for at, text in steps:  # add the new token, send it, remove the old: mid-job, under load
                running = wait_for(client, job.job_id, lambda j, n=at: j.processed >= n or j.state in ENDED,
                                   timeout=120, what=f"{at} images sorted")
                assert running.state == pb.JOB_STATE_RUNNING and running.processed < IMAGES, running
                replace(token_file, text)
            job = client.wait(job.job_id, timeout_s=120)
        assert not load.failures, load.failures[:5]
        assert load.ok > 20, "the load hardly ran"
        print(f"token rotation under load: {job.processed} images sorted, {load.ok} gateway and {load.ok} gRPC "
              f"calls, {len(load.failures)} failed")
        assert job.state == pb.JOB_STATE_SUCCEEDED and (job.processed, job.failed) == (IMAGES, 0), job

        # The old token is refused now, by every server; the new one is served.
        with InferenceClient(ChannelOptions(inference.address, token=OLD, retries=1)) as old:
            with pytest.raises(grpc.RpcError) as refused:
                old.classify(encode(fashion_images(1)[0][0]))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with BatchClient(ChannelOptions(batch.address, token=OLD, retries=1)) as old_batch:
            with pytest.raises(grpc.RpcError) as refused:
                old_batch.get(job.job_id)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = httpx.get(f"{gateway.url}/stats", headers={"authorization": f"Bearer {OLD}"})
        assert resp.status_code == 401, resp.text
        assert httpx.get(f"{gateway.url}/stats", headers={"authorization": f"Bearer {NEW}"}).status_code == 200
    finally:
        for process in (gateway, batch, inference):
            if process is not None:
                process.terminate()


def test_a_token_file_is_followed_through_every_way_it_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(TokenFileError, match="cannot read the token file"):
        TokenFile(path).tokens()
    path.write_text("")
    with pytest.raises(TokenFileError, match="is empty"):
        TokenFile(path).tokens()
    tokens = TokenFile(path)
    replace(path, f"{OLD}\n")
    assert tokens.tokens() == (OLD,) and tokens.primary() == OLD
    replace(path, f"{OLD}\n{NEW}\n")  # a new file: seen by the next call
    assert tokens.tokens() == (OLD, NEW)
    path.write_text(f"{NEW}\n{OLD}\n")  # rewritten in place, same size, maybe the same timestamp
    time.sleep(RECHECK_S + 0.1)
    assert tokens.primary() == NEW
    path.write_text("")  # a Secret in the middle of being replaced: the last tokens stay
    assert tokens.tokens() == (NEW, OLD)
    path.unlink()
    assert tokens.tokens() == (NEW, OLD)
    replace(path, f"# rotated on 2026-12-01: {OLD} retired\n\n  # the current one\n{NEW}\n")
    assert tokens.tokens() == (NEW,)  # a comment line was a token: "Bearer # rotated ..." was let in


def served_serial(port: int, ca: Path) -> int:
    """The serial number of the certificate a new TLS connection to `port` is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_renewed_certificate_reaches_new_connections_without_a_restart_or_a_failed_call(
        tmp_path: Path, linear_model) -> None:
    """The files change as a Kubernetes Secret volume changes them: a new folder, then one rename of
    the link that points at it, so the key and the certificate switch together."""
    pki = make_pki(tmp_path / "pki")
    mount = tmp_path / "mount"
    *_, first_serial = renew_server_certificate(pki, mount / "v1")
    (mount / "current").symlink_to("v1")
    health_port = free_port()
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_HEALTH_PORT=str(health_port),
                                FASHION_TLS_CERT=str(mount / "current" / "tls.crt"),
                                FASHION_TLS_KEY=str(mount / "current" / "tls.key"))
    port = int(inference.address.rsplit(":", 1)[1])
    image = encode(fashion_images(1)[0][0])
    failures: list[str] = []
    calls = 0
    stop = threading.Event()

    def steady_calls() -> None:  # one long-lived channel, calling throughout the renewal
        nonlocal calls
        with InferenceClient(ChannelOptions(inference.address, root_ca=pki.ca, server_name="localhost")) as client:
            while not stop.is_set():
                try:
                    client.classify(image)
                    calls += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    try:
        ServiceProcess(inference.proc, f"127.0.0.1:{health_port}", inference.log_path, {}).wait_serving()
        assert served_serial(port, pki.ca) == first_serial
        caller = threading.Thread(target=steady_calls)
        caller.start()
        time.sleep(0.5)
        # A careless renewal first: the new key beside the old certificate. Not used: the old pair stays.
        second_serial = renew_carelessly(pki, mount)
        assert served_serial(port, pki.ca) == first_serial
        mount_version(mount, "v2")
        assert served_serial(port, pki.ca) == second_serial  # the very next connection
        with InferenceClient(ChannelOptions(inference.address, root_ca=pki.ca, server_name="localhost")) as fresh:
            assert fresh.classify(image).category
        time.sleep(0.5)
        stop.set()
        caller.join(30)
        assert not failures, failures[:5]
        assert calls > 10
        print(f"certificate renewal: {calls} calls on a long-lived channel, {len(failures)} failed")
        assert inference.proc.poll() is None  # no restart
        assert "TLS certificate files changed" in inference.output()
    finally:
        stop.set()
        inference.terminate()


def test_a_token_file_that_turns_into_non_text_keeps_the_last_tokens(tmp_path: Path, linear_model) -> None:
    """A token file rewritten with bytes that are not UTF-8 (a wrong file, a half-written one) is treated as a
    missing file is: the service keeps the tokens it last read and logs it once; it does not fail every call."""
    token_file = tmp_path / "token"
    token_file.write_text(f"{OLD}\n")
    inference = start_inference(tmp_path / "inference", linear_model[0], FASHION_AUTH_TOKEN_FILE=str(token_file))
    try:
        inference.wait_serving()
        image = encode(fashion_images(1)[0][0])
        with InferenceClient(ChannelOptions(inference.address, token=OLD, retries=1)) as client:
            client.classify(image)
            token_file.write_bytes(f"{OLD}\n".encode() + b"\xff\xfe\n")
            for _ in range(3):
                client.classify(image)  # UNKNOWN for every call before
                time.sleep(RECHECK_S / 2)
        with InferenceClient(ChannelOptions(inference.address, token="wrong", retries=1)) as wrong:
            with pytest.raises(grpc.RpcError) as refused:
                wrong.classify(image)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        inference.terminate()
    assert inference.output().count(f"The token file {token_file} is not UTF-8 text") == 1, inference.output()
    with pytest.raises(TokenFileError, match="is not UTF-8 text"):
        TokenFile(token_file).tokens()

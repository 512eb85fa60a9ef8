"""Token rotation under load: one token file shared by the Inference service, the Batch service and
the gateway (as one mounted Secret would be) is rewritten in the documented three steps while a
batch job of thousands of images runs and a client keeps calling the gateway and the Inference
service. Nothing may fail; afterwards the old token is refused everywhere."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from fashion.client import BatchClient, ChannelOptions, InferenceClient, TokenFile, TokenFileError
from fashion.client._token import RECHECK_S
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import BatchHome, wait_for, write_images
from tests.conftest import start_inference
from tests.gateway.conftest import start_gateway
from tests.images import encode, fashion_images

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

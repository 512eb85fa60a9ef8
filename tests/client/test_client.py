"""The Python client on its own: retries on UNAVAILABLE with backoff, deadlines, sync and asyncio,
and no dependency on the services' code. The server here is a real gRPC server on a real port
whose first answers are UNAVAILABLE (a restarting replica)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fashion.client import AsyncInferenceClient, ChannelOptions, ImageFileError, InferenceClient
from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from tests.support import REPO, inference_stand_in


class Flaky(pb_grpc.InferenceServiceServicer):
    """UNAVAILABLE for the first `failures` calls, then an answer; GetStats sleeps (deadlines)."""

    def __init__(self) -> None:
        self.failures = 0
        self.calls = 0
        self.seen_metadata: list[dict[str, str]] = []

    def Classify(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.seen_metadata.append(dict(context.invocation_metadata()))
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.ClassifyResponse(category="Bag", confidence=0.9, request_id=request.request_id)

    def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        time.sleep(1.0)
        return pb.Stats()


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    servicer = Flaky()
    with inference_stand_in(servicer) as address:
        yield servicer, address


def test_retries_unavailable_with_backoff_then_answers(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    servicer.failures = 2
    with InferenceClient(ChannelOptions(address, retries=5, token="t0k")) as client:
        r = client.classify(b"img")
    assert r.category == "Bag"
    assert servicer.calls == 3, "two UNAVAILABLE answers retried, the third attempt answered"
    assert all(md.get("authorization") == "Bearer t0k" for md in servicer.seen_metadata)


def test_without_retries_unavailable_reaches_the_caller(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    servicer.failures = 1
    with InferenceClient(ChannelOptions(address, retries=1)) as client, pytest.raises(grpc.RpcError) as err:
        client.classify(b"img")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 1


def test_deadlines(flaky: tuple[Flaky, str]) -> None:
    _, address = flaky
    with InferenceClient(ChannelOptions(address, timeout_s=0.2)) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.stats()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.stats(timeout_s=5).uptime_seconds == 0  # a per-call deadline overrides the default


def test_asyncio_client_retries_too(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    servicer.failures = 2

    async def main() -> str:
        async with AsyncInferenceClient(ChannelOptions(address)) as client:
            return (await client.classify(b"img")).category

    assert asyncio.run(main()) == "Bag" and servicer.calls == 3


def test_call_metadata_is_asked_for_as_each_call_starts(flaky: tuple[Flaky, str]) -> None:
    """ChannelOptions.call_metadata (what the services pass their trace context through): its metadata
    as of each call, beside the token, on the sync and the asyncio client."""
    servicer, address = flaky
    asked = iter(range(100))

    def trace_context() -> tuple[tuple[str, str], ...]:
        return (("traceparent", f"00-{next(asked):032x}-b7ad6b7169203331-01"),)

    options = ChannelOptions(address, token="t0k", call_metadata=trace_context)
    with InferenceClient(options) as client:
        client.classify(b"img")
        client.classify(b"img")

    async def main() -> None:
        async with AsyncInferenceClient(options) as client:
            await client.classify(b"img")

    asyncio.run(main())
    assert [md["traceparent"][3:35] for md in servicer.seen_metadata] == [f"{i:032x}" for i in range(3)]
    assert all(md["authorization"] == "Bearer t0k" for md in servicer.seen_metadata)


@pytest.mark.timeout(60)
def test_a_path_that_is_no_image_file_is_refused_before_any_call(flaky: tuple[Flaky, str], tmp_path: Path) -> None:
    """A FIFO hung classify(path) (read_bytes waits for a writer), /dev/zero was read until memory ran out,
    and a file over what a call can carry was sent whole to fail; each is now ImageFileError, no call made."""
    servicer, address = flaky
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    large = tmp_path / "large.png"
    large.write_bytes(b"\0" * (1 << 20))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg bytes")
    options = ChannelOptions(address, max_message_bytes=512 * 1024)
    with InferenceClient(options) as client:
        for path, words, kind in ((fifo, "not a regular file", ImageFileError.NOT_REGULAR),
                                  ("/dev/zero", "not a regular file", ImageFileError.NOT_REGULAR),
                                  (tmp_path, "a folder", ImageFileError.FOLDER),
                                  (large, "too large to classify: 1.0 MiB (limit 0.4 MiB)", ImageFileError.TOO_LARGE)):
            with pytest.raises(ImageFileError) as err:
                client.classify(path)
            assert err.value.reason == words and err.value.kind == kind and str(path) in str(err.value)
            assert err.value.folder == (kind == ImageFileError.FOLDER)
            with pytest.raises(ImageFileError):
                client.classify_batch([photo, path])
        with pytest.raises(FileNotFoundError):
            client.classify(tmp_path / "missing.png")
        assert servicer.calls == 0
        assert client.classify(photo).category == "Bag"

    async def main() -> None:
        async with AsyncInferenceClient(options) as client:
            with pytest.raises(ImageFileError, match="not a regular file"):
                await client.classify(fifo)

    asyncio.run(main())
    assert servicer.calls == 1


def test_client_needs_nothing_from_the_services() -> None:
    """A user who installs the package uses fashion.client without the services' code."""
    code = ("import sys; sys.modules['services'] = None\n"
            "from fashion.client import InferenceClient, AsyncInferenceClient, ChannelOptions, MonitorClient\n"
            "from fashion.client.batch import BatchClient\n"
            "o = ChannelOptions.from_env('localhost:1')\n"
            "assert o.tls and o.token == 'abc' and o.lb_policy == 'round_robin' and o.server_name == 'svc'\n"
            "print('ok')")
    env = {"FASHION_TLS_CA": str(REPO / "pyproject.toml"), "FASHION_AUTH_TOKEN": "abc",
           "FASHION_GRPC_LB_POLICY": "round_robin", "FASHION_TLS_SERVER_NAME": "svc", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

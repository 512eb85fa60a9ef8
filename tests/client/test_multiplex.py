"""ClassifyMultiplexer against a real Inference service: many concurrent callers over shared
streams each get exactly their own answer (the same as a unary Classify), errors per image, and
recovery when the service restarts under it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fashion.client import AsyncInferenceClient, ChannelOptions
from fashion.client.multiplex import ClassifyMultiplexer
from tests.conftest import inference_env
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, start_service


def test_concurrent_callers_get_their_own_answers(inference_server: ServiceProcess) -> None:
    x, _ = fashion_images(96)
    images = [encode(img) for img in x]

    async def main() -> None:
        async with AsyncInferenceClient(ChannelOptions(inference_server.address)) as client:
            mux = ClassifyMultiplexer(client, streams=2, recycle_s=0.2)
            want = [await client.classify(img, top_k=3) for img in images]
            for _ in range(2):  # the second round runs on replaced streams (recycle_s)
                got = await asyncio.gather(*(mux.classify(img, top_k=3) for img in images))
                for w, g in zip(want, got, strict=True):
                    assert [c.index for c in g.top_k] == [c.index for c in w.top_k]
                    assert g.confidence == pytest.approx(w.confidence, rel=1e-5)
                await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mux.classify(b"not an image")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not an image" in err.value.details()
            assert (await mux.classify(images[0])).category  # the stream goes on after a bad image
            await mux.close()

    asyncio.run(main())


def test_survives_a_restart_of_the_service(tmp_path: Path, linear_model) -> None:
    env = inference_env(linear_model[0])
    address = f"127.0.0.1:{env['FASHION_INFERENCE_PORT']}"
    first = start_service("services.inference", tmp_path / "a", env, address)
    first.wait_serving()
    x, _ = fashion_images(8)
    images = [encode(img) for img in x]

    async def main() -> None:
        async with AsyncInferenceClient(ChannelOptions(address, timeout_s=30)) as client:
            mux = ClassifyMultiplexer(client)
            assert all(r.category for r in await asyncio.gather(*(mux.classify(i) for i in images)))
            await asyncio.to_thread(first.terminate)
            second = start_service("services.inference", tmp_path / "b", env, address)
            try:
                await asyncio.to_thread(second.wait_serving)
                results = await asyncio.gather(*(mux.classify(i) for i in images))
                assert all(r.category for r in results)
            finally:
                await mux.close()
                await asyncio.to_thread(second.terminate)

    asyncio.run(main())

"""ClassifyCoalescer against a real Inference service: many concurrent callers sent together in a
few ClassifyBatch calls each get exactly their own answer (the same as a unary Classify, with
their own top_k), errors per image, calls kept under the message limit, and recovery when the
service restarts under it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fashion.client import AsyncInferenceClient, ChannelOptions
from fashion.client.coalesce import FRAMING_BYTES, ClassifyCoalescer
from tests.conftest import inference_env
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, start_service


class CountingClient(AsyncInferenceClient):
    """The real client, recording what each ClassifyBatch call carried."""

    calls: list[list[int]]

    async def classify_batch(self, images, top_k=0, timeout_s=None, requests=0):  # type: ignore[no-untyped-def, override]
        images = list(images)
        self.calls.append([len(r.image) for r in images])
        return await super().classify_batch(images, top_k, timeout_s, requests)


def test_concurrent_callers_get_their_own_answers_in_few_calls(inference_server: ServiceProcess) -> None:
    x, _ = fashion_images(96)
    images = [encode(img) for img in x]
    ks = [1 + i % 5 for i in range(len(images))]

    async def main() -> None:
        async with CountingClient(ChannelOptions(inference_server.address)) as client:
            client.calls = []
            coalescer = ClassifyCoalescer(client, max_calls=2)
            want = [await client.classify(img, top_k=k) for img, k in zip(images, ks, strict=True)]
            before = await client.stats()
            got = await asyncio.gather(*(coalescer.classify(img, top_k=k) for img, k in zip(images, ks, strict=True)))
            for w, g, k in zip(want, got, ks, strict=True):
                assert len(g.top_k) == k
                assert [c.index for c in g.top_k] == [c.index for c in w.top_k]
                assert g.confidence == pytest.approx(w.confidence, rel=1e-5)
                assert (g.category, g.model_name, g.model_version) == (w.category, w.model_name, w.model_version)
            # The first caller left alone; the others waited for it and went together.
            assert sum(len(c) for c in client.calls) == len(images)
            assert len(client.calls) <= 4 and client.calls[0] == [len(images[0])]
            # ... and each still counts as a request in the service's statistics (the monitoring guide's /stats).
            after = await client.stats()
            assert after.total_requests - before.total_requests == len(images)
            assert after.total_images_processed - before.total_images_processed == len(images)

            bad = await asyncio.gather(*(coalescer.classify(img) for img in [images[0], b"not an image", images[1]]),
                                       return_exceptions=True)
            assert isinstance(bad[1], grpc.aio.AioRpcError)
            assert bad[1].code() == grpc.StatusCode.INVALID_ARGUMENT and "not an image" in (bad[1].details() or "")
            assert bad[0].category == want[0].category and bad[2].category == want[1].category  # type: ignore[union-attr]
            await coalescer.close()

    asyncio.run(main())


def test_calls_stay_under_the_message_limit(inference_server: ServiceProcess) -> None:
    x, _ = fashion_images(40)
    images = [encode(img) for img in x]
    limit = FRAMING_BYTES + 4 * max(len(i) for i in images)  # room for about four images per call

    async def main() -> None:
        options = ChannelOptions(inference_server.address, max_message_bytes=limit)
        async with CountingClient(options) as client:
            client.calls = []
            coalescer = ClassifyCoalescer(client, max_calls=1)
            got = await asyncio.gather(*(coalescer.classify(img) for img in images))
            assert all(r.category for r in got)
            assert sum(len(c) for c in client.calls) == len(images)
            assert all(sum(c) <= limit - FRAMING_BYTES for c in client.calls)
            assert max(len(c) for c in client.calls) >= 3  # ... and still several per call
            await coalescer.close()

    asyncio.run(main())


def test_close_fails_the_waiting_callers(inference_server: ServiceProcess) -> None:
    x, _ = fashion_images(32)
    images = [encode(img) for img in x]

    async def main() -> None:
        async with AsyncInferenceClient(ChannelOptions(inference_server.address)) as client:
            coalescer = ClassifyCoalescer(client, max_calls=1, max_batch=1)
            pending = [asyncio.ensure_future(coalescer.classify(img)) for img in images]
            await asyncio.sleep(0)  # all queued, the first call started
            await coalescer.close()
            results = await asyncio.gather(*pending, return_exceptions=True)
            cancelled = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert cancelled and all(r.code() == grpc.StatusCode.CANCELLED for r in cancelled)

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
            coalescer = ClassifyCoalescer(client)
            assert all(r.category for r in await asyncio.gather(*(coalescer.classify(i) for i in images)))
            await asyncio.to_thread(first.terminate)
            second = start_service("services.inference", tmp_path / "b", env, address)
            try:
                await asyncio.to_thread(second.wait_serving)
                results = await asyncio.gather(*(coalescer.classify(i) for i in images))
                assert all(r.category for r in results)
            finally:
                await coalescer.close()
                await asyncio.to_thread(second.terminate)

    asyncio.run(main())

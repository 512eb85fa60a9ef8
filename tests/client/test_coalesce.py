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
    """The real client, recording what each ClassifyBatch call carried (image sizes) and each Classify call."""

    def __init__(self, options: ChannelOptions) -> None:
        super().__init__(options)
        self.calls: list[list[int]] = []
        self.lone: list[int] = []

    async def classify_batch(self, images, top_k=0, timeout_s=None, requests=0):  # type: ignore[no-untyped-def, override]
        images = list(images)
        self.calls.append([len(r.image) for r in images])
        return await super().classify_batch(images, top_k, timeout_s, requests)

    async def classify(self, image, top_k=0, timeout_s=None):  # type: ignore[no-untyped-def, override]
        self.lone.append(len(image))
        return await super().classify(image, top_k, timeout_s)


def test_concurrent_callers_get_their_own_answers_in_few_calls(inference_server: ServiceProcess) -> None:
    x, _ = fashion_images(96)
    images = [encode(img) for img in x]
    ks = [1 + i % 5 for i in range(len(images))]

    async def main() -> None:
        async with CountingClient(ChannelOptions(inference_server.address)) as client:
            client.calls = []
            coalescer = ClassifyCoalescer(client, max_calls=2)
            want = [await client.classify(img, top_k=k) for img, k in zip(images, ks, strict=True)]
            client.lone = []
            before = await client.stats()
            got = await asyncio.gather(*(coalescer.classify(img, top_k=k) for img, k in zip(images, ks, strict=True)))
            for w, g, k in zip(want, got, ks, strict=True):
                assert len(g.top_k) == k
                assert [c.index for c in g.top_k] == [c.index for c in w.top_k]
                assert g.confidence == pytest.approx(w.confidence, rel=1e-5)
                assert (g.category, g.model_name, g.model_version) == (w.category, w.model_name, w.model_version)
            # The first caller left alone, in a Classify call; the others waited for it and went together.
            assert client.lone == [len(images[0])]
            assert sum(len(c) for c in client.calls) == len(images) - 1
            assert len(client.calls) <= 4
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


def test_one_caller_at_a_time_gets_classify_calls_and_deadlines_hold(inference_server: ServiceProcess) -> None:
    """Callers one after another each get a Classify call of their own (no batch framing); a caller that
    arrives while a call is in flight waits for it, and one whose deadline passes while waiting gets
    DEADLINE_EXCEEDED without ever being sent."""
    x, _ = fashion_images(6)
    images = [encode(img) for img in x]

    async def main() -> None:
        async with CountingClient(ChannelOptions(inference_server.address)) as client:
            client.calls, client.lone = [], []
            coalescer = ClassifyCoalescer(client, max_calls=1)
            alone = [await coalescer.classify(img, top_k=2) for img in images]
            assert [len(r.top_k) for r in alone] == [2] * 6
            assert client.lone == [len(i) for i in images] and client.calls == []
            first = asyncio.ensure_future(coalescer.classify(images[0]))
            await asyncio.sleep(0)  # the first is in its call: the next ones wait for it
            late = await asyncio.gather(coalescer.classify(images[1], timeout_s=1e-6),
                                        coalescer.classify(images[2]), return_exceptions=True)
            assert isinstance(late[0], grpc.aio.AioRpcError) and late[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert late[1].category and (await first).category  # type: ignore[union-attr]
            assert client.calls == [[len(images[2])]], "the timed-out caller was never sent"
            await coalescer.close()

    asyncio.run(main())


def test_a_call_starts_beside_one_in_flight_only_for_a_group(inference_server: ServiceProcess) -> None:
    """Under load, a call that ends is not followed at once by a call of the one image that arrived
    meanwhile: while a call is in flight, the next starts only once `min_beside` images wait; else
    what waits leaves together when the call ends."""
    x, _ = fashion_images(12)
    images = [encode(img) for img in x]

    async def settle() -> None:  # the callers' tasks run, then the tasks of the calls they start
        for _ in range(3):
            await asyncio.sleep(0)

    async def main() -> None:
        async with CountingClient(ChannelOptions(inference_server.address)) as client:
            client.calls, client.lone = [], []
            coalescer = ClassifyCoalescer(client, max_calls=2, min_beside=3)
            first = asyncio.ensure_future(coalescer.classify(images[0]))
            await asyncio.sleep(0)  # in its own Classify call
            waiting = [asyncio.ensure_future(coalescer.classify(img)) for img in images[1:3]]
            await settle()  # they wait, and a call they started would have begun
            assert client.calls == [], "two waiting images do not start a call beside the one in flight"
            waiting.append(asyncio.ensure_future(coalescer.classify(images[3])))
            await settle()
            assert client.calls == [[len(i) for i in images[1:4]]], "the third does"
            assert all(r.category for r in await asyncio.gather(first, *waiting))

            coalescer.min_beside = 100
            first = asyncio.ensure_future(coalescer.classify(images[4]))
            await asyncio.sleep(0)
            rest = [asyncio.ensure_future(coalescer.classify(img)) for img in images[5:]]
            assert all(r.category for r in await asyncio.gather(first, *rest))
            assert client.calls[1:] == [[len(i) for i in images[5:]]], "the rest left together when the call ended"
            assert client.lone == [len(images[0]), len(images[4])]
            await coalescer.close()

    asyncio.run(main())


def test_calls_stay_under_the_message_limit(inference_server: ServiceProcess) -> None:
    x, _ = fashion_images(40)
    images = [encode(img) for img in x]
    limit = FRAMING_BYTES + 4 * max(len(i) for i in images)  # room for about four images per call

    async def main() -> None:
        options = ChannelOptions(inference_server.address, max_message_bytes=limit)
        async with CountingClient(options) as client:
            client.calls, client.lone = [], []
            coalescer = ClassifyCoalescer(client, max_calls=1)
            got = await asyncio.gather(*(coalescer.classify(img) for img in images))
            assert all(r.category for r in got)
            assert sum(len(c) for c in client.calls) + len(client.lone) == len(images)
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

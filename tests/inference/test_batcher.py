"""The DynamicBatcher contract: every caller gets exactly its own rows, whatever it shares a
batch with (the bug of MLServer issue #1306 must not happen here)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from services.inference.batcher import DynamicBatcher, QueueFull


class RecordingModel:
    """out[i] = [sum(x[i]), batch size, 1]: identifies the row and shows how batches formed."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(x))
        time.sleep(self.delay_s)
        sums = x.reshape(len(x), -1).sum(axis=1)
        return np.stack([sums, np.full(len(x), len(x)), np.ones(len(x))], axis=1)


async def test_concurrent_callers_get_their_own_rows_in_order() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch_size=16)
    batcher.start()
    rng = random.Random(0)

    async def caller(i: int) -> None:
        n = rng.randint(1, 5)
        rows = np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 1000 * i
        await asyncio.sleep(rng.random() / 100)
        out, timing = await batcher.submit(rows)
        assert out.shape == (n, 3)
        np.testing.assert_array_equal(out[:, 0], rows.sum(axis=1))
        assert timing.queued_at <= timing.started_at <= timing.finished_at

    await asyncio.gather(*(caller(i) for i in range(200)))
    await batcher.stop()
    assert max(model.batches) <= 16
    assert max(model.batches) > 1, "concurrent requests should have been merged"
    assert model.threads and all(t.startswith("onnx") for t in model.threads), "inference off the event loop"


async def test_large_request_is_split_and_reassembled() -> None:
    model = RecordingModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=8)
    batcher.start()
    rows = np.arange(21 * 2, dtype=np.float32).reshape(21, 2)
    out, _ = await batcher.submit(rows)
    np.testing.assert_array_equal(out[:, 0], rows.sum(axis=1))
    assert sorted(model.batches) == [5, 8, 8]
    await batcher.stop()


async def test_max_delay_waits_for_a_fuller_batch() -> None:
    model = RecordingModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=64, max_delay_s=0.05)
    batcher.start()

    async def one(i: int) -> None:
        await asyncio.sleep(0.002 * i)
        out, _ = await batcher.submit(np.full((1, 2), i, np.float32))
        assert out[0, 0] == 2 * i

    await asyncio.gather(*(one(i) for i in range(10)))
    await batcher.stop()
    assert model.batches == [10], model.batches


async def test_zero_delay_runs_a_lone_request_at_once() -> None:
    model = RecordingModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=64, max_delay_s=0)
    batcher.start()
    start = time.perf_counter()
    await batcher.submit(np.ones((1, 2), np.float32))
    assert time.perf_counter() - start < 0.5
    await batcher.stop()


async def test_a_failing_batch_fails_only_its_callers() -> None:
    calls = 0

    def flaky(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("engine hiccup")
        return x.sum(axis=1, keepdims=True)

    batcher = DynamicBatcher(flaky, max_batch_size=4)
    batcher.start()
    with pytest.raises(RuntimeError, match="engine hiccup"):
        await batcher.submit(np.ones((2, 3), np.float32))
    out, _ = await batcher.submit(np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(out, [[3.0], [3.0]])
    await batcher.stop()


async def test_queue_limit_refuses_new_work() -> None:
    gate = threading.Event()

    def blocked(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return x

    batcher = DynamicBatcher(blocked, max_batch_size=4, max_queue_size=6)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(np.ones((4, 1), np.float32)))
    await asyncio.sleep(0.05)  # first batch is now running, queue empty
    queued = asyncio.ensure_future(batcher.submit(np.ones((5, 1), np.float32)))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await batcher.submit(np.ones((2, 1), np.float32))
    gate.set()
    await asyncio.gather(first, queued)
    await batcher.stop()


async def test_cancelled_caller_does_not_disturb_others() -> None:
    model = RecordingModel(delay_s=0.02)
    batcher = DynamicBatcher(model, max_batch_size=4)
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit(np.zeros((4, 1), np.float32)))
    await asyncio.sleep(0.005)
    doomed = asyncio.ensure_future(batcher.submit(np.full((1, 1), 5, np.float32)))
    kept = asyncio.ensure_future(batcher.submit(np.full((1, 1), 7, np.float32)))
    await asyncio.sleep(0)
    doomed.cancel()
    out, _ = await kept
    assert out[0, 0] == 7
    await blocker
    await batcher.stop()

"""The DynamicBatcher contract: every caller gets exactly its own rows, whatever it shares a
batch with (the bug of MLServer issue #1306 must not happen here)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from services.inference import decoding as dec
from services.inference.batcher import INLINE_IMAGE_BYTES, DynamicBatcher, QueueFull
from services.inference.decoding import Decoded, Item


class RecordingModel:
    """out[i] = [sum(x[i]), batch size, 1]: identifies the row and shows how batches formed."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.threads: set[str] = set()
        self.runs: list[tuple[int, str]] = []
        """(rows, thread) of every run."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.runs.append((len(x), threading.current_thread().name))
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
    # Batches run off the event loop; only a lone one-row request (nothing else queued or in flight, which the
    # callers' random start times sometimes leave) may run on it (test_a_lone_small_request_runs_on_the_event_loop).
    merged = [thread for rows, thread in model.runs if rows > 1]
    assert merged and all(t.startswith("onnx") for t in merged), "inference off the event loop"


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
    # Two batches in flight (one in the model, one waiting for it), then a queue of 5 rows.
    running = []
    for _ in range(2):
        running.append(asyncio.ensure_future(batcher.submit(np.ones((4, 1), np.float32))))
        await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(batcher.submit(np.ones((5, 1), np.float32)))
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 5
    with pytest.raises(QueueFull, match="server overloaded"):
        await batcher.submit(np.ones((2, 1), np.float32))
    gate.set()
    await asyncio.gather(*running, queued)
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


def _row(data: bytes) -> np.ndarray:
    """A stand-in decoder: b"<n>" -> a row of n's; anything else is unusable."""
    if not data.isdigit():
        raise ValueError(f"not a number: {data!r}")
    return np.full((4,), float(data), np.float32)


def _prepare(data: bytes) -> np.ndarray:
    thread = threading.current_thread()
    assert thread.name.startswith("onnx") or thread is threading.main_thread(), \
        "images are decoded on the engine thread, or a lone small one on the event loop"
    return _row(data)


class StandInWorkers:
    """A stand-in WorkerPool: decodes the whole batch at once, errors by position, and, when it
    `runs_model`, answers with RecordingModel's outputs for every usable row in request order."""

    def __init__(self, runs_model: bool) -> None:
        self.runs_model = runs_model
        self.batches: list[int] = []  # encoded images per batch
        self.inferred: list[int] = []  # rows per model run

    async def run(self, items: list[Item]) -> Decoded:
        encoded = dec.encoded_images(items)
        assert self.runs_model or len(encoded) == sum(len(i) for i in items), "tensors only go to a model"
        self.batches.append(len(encoded))
        decoded = dec.decode_images(_row, encoded)
        if not self.runs_model:
            return decoded
        pieces = dec.model_inputs(items, decoded.rows, dec.request_errors(items, decoded.errors))
        if not pieces:
            return decoded
        self.inferred.append(sum(len(p) for p in pieces))
        return decoded._replace(rows=RecordingModel(delay_s=0)(dec.concat(pieces)), compute_s=0.001)


DECODING = ("prepare", "decoding workers", "workers running the model")


def decoding_kwargs(decoding: str) -> dict[str, object]:
    if decoding == "prepare":
        return {"prepare": _prepare}
    return {"prepare": _prepare, "workers": StandInWorkers(runs_model=decoding == "workers running the model")}


@pytest.mark.parametrize("decoding", DECODING)
async def test_encoded_images_are_decoded_with_their_batch_and_fail_alone(decoding: str) -> None:
    model = RecordingModel()
    kwargs = decoding_kwargs(decoding)
    batcher = DynamicBatcher(model, **kwargs, max_batch_size=8)  # type: ignore[arg-type]
    batcher.start()
    rows = np.ones((3, 4), np.float32)
    mixed = await asyncio.gather(
        batcher.submit(rows),
        *(batcher.submit_encoded(str(i).encode()) for i in range(10)),
        batcher.submit_encoded(b"garbage"),
        return_exceptions=True,
    )
    tensor_out, *encoded, bad = mixed
    np.testing.assert_array_equal(tensor_out[0][:, 0], [4.0, 4.0, 4.0])
    for i, (out, timing) in enumerate(encoded):
        assert out.shape == (1, 3) and out[0, 0] == 4 * i
        assert timing.started_at <= timing.decoded_at <= timing.finished_at
    assert isinstance(bad, ValueError) and "not a number" in str(bad)
    many, _ = await batcher.submit_encoded_many([b"7", b"x", b"9"])
    assert many[0][0, 0] == 28 and isinstance(many[1], ValueError) and many[2][0, 0] == 36
    # More images than a batch holds: split, decoded, reassembled in order.
    images = [str(i).encode() if i % 7 else b"bad" for i in range(21)]
    results, _ = await batcher.submit_encoded_many(images)
    for i, r in enumerate(results):
        if i % 7:
            assert r.shape == (1, 3) and r[0, 0] == 4 * i
        else:
            assert isinstance(r, ValueError)
    await batcher.stop()
    workers = kwargs.get("workers")
    inferred = workers.inferred if isinstance(workers, StandInWorkers) else []
    assert max(model.batches + inferred) <= 8
    # Every usable row (3 tensor rows, 10 + 2 + 18 images) went through a model exactly once:
    # here, or in the workers that run it.
    assert sum(model.batches) + sum(inferred) == 33
    if decoding == "decoding workers":  # batches of several images went to the workers, lone ones did not
        assert isinstance(workers, StandInWorkers) and workers.batches and min(workers.batches) > 1
    if decoding == "workers running the model":  # everything did, tensors included: no model run here
        assert model.batches == [] and inferred


@pytest.mark.parametrize("decoding", DECODING)
async def test_a_batch_of_only_bad_images_runs_no_model(decoding: str) -> None:
    model = RecordingModel()
    kwargs = decoding_kwargs(decoding)
    batcher = DynamicBatcher(model, **kwargs, max_batch_size=8)  # type: ignore[arg-type]
    batcher.start()
    outcomes, _ = await batcher.submit_encoded_many([b"a", b"b"])
    assert all(isinstance(o, ValueError) for o in outcomes)
    workers = kwargs.get("workers")
    assert model.batches == [] and not (isinstance(workers, StandInWorkers) and workers.inferred)
    await batcher.stop()


class GatedWorkers(StandInWorkers):
    """Workers running the model whose batches wait for `gate`: counts the batches in them at once."""

    def __init__(self) -> None:
        super().__init__(runs_model=True)
        self.gate = asyncio.Event()
        self.running = 0

    async def run(self, items: list[Item]) -> Decoded:
        self.running += 1
        try:
            await self.gate.wait()
            return await super().run(items)
        finally:
            self.running -= 1


async def test_batches_run_by_workers_start_beside_each_other() -> None:
    workers = GatedWorkers()
    model = RecordingModel()
    batcher = DynamicBatcher(model, prepare=_prepare, workers=workers, max_batch_size=8)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_encoded_many([b"1", b"3"]))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.submit_encoded(b"2"))
    await asyncio.sleep(0.01)
    assert workers.running == 2, "a lone image does not wait for a batch in the other worker"
    workers.gate.set()
    assert [r[0, 0] for r in (await first)[0]] == [4, 12] and (await second)[0][0, 0] == 8
    assert model.batches == [], "an image arriving while a batch is in flight goes to a worker too"
    await batcher.stop()


@pytest.mark.parametrize("request_kind", ["image", "tensor row"])
async def test_one_user_at_a_time_is_served_here_without_the_worker_round_trip(request_kind: str) -> None:
    """Workers that run the model: a lone one-row request with nothing else queued or in flight runs on
    the engine thread here; anything larger, or anything arriving together, still goes to the workers."""
    workers = StandInWorkers(runs_model=True)
    model = RecordingModel(delay_s=0)
    batcher = DynamicBatcher(model, prepare=_prepare, workers=workers, max_batch_size=8)
    batcher.start()

    async def one(i: int) -> float:
        if request_kind == "image":
            return float((await batcher.submit_encoded(str(i).encode()))[0][0, 0])
        return float((await batcher.submit(np.full((1, 4), i, np.float32)))[0][0, 0])

    assert [await one(i) for i in range(1, 6)] == [4, 8, 12, 16, 20]
    assert model.batches == [1] * 5 and workers.batches == [], "one at a time: all here"
    together = await asyncio.gather(*(one(i) for i in range(6, 10)))
    assert together == [24, 28, 32, 36]
    assert sum(workers.inferred) >= 3, "requests arriving together went to the workers"
    assert sum(model.batches) + sum(workers.inferred) == 9
    pair, _ = await batcher.submit_encoded_many([b"1", b"2"])
    assert [r[0, 0] for r in pair] == [4, 8] and workers.inferred[-1] == 2, "a request of two images goes to a worker"
    await batcher.stop()


class GatedModel(RecordingModel):
    """Each run starts (`started` set), then waits for `gate`: a test decides what arrives meanwhile,
    whatever the machine's load."""

    def __init__(self) -> None:
        super().__init__(delay_s=0)
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.started.set()
        self.gate.wait(30)
        return super().__call__(x)


async def test_batches_sharing_the_model_here_wait_to_form_a_fuller_batch() -> None:
    model = GatedModel()
    batcher = DynamicBatcher(model, prepare=_prepare, max_batch_size=8)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_encoded_many([b"1", b"0"]))  # two images: the engine thread
    assert await asyncio.to_thread(model.started.wait, 30)
    rest = []
    for i in range(2, 5):  # one by one while the first runs
        rest.append(asyncio.ensure_future(batcher.submit_encoded(str(i).encode())))
        await asyncio.sleep(0.01)
    assert batcher.queue_depth == 3
    model.gate.set()
    assert [r[0, 0] for r in (await first)[0]] == [4, 0]
    assert [(await f)[0][0, 0] for f in rest] == [8, 12, 16]
    assert model.batches == [2, 3], "the three that came while the first ran formed one batch"
    assert model.threads == {"onnx_0"}
    await batcher.stop()


@pytest.mark.parametrize("decoding", DECODING)
async def test_a_lone_small_request_runs_on_the_event_loop(decoding: str) -> None:
    """One user at a time: a one-row tensor or a small image runs on the event loop (no thread hand-off);
    a large image, alone too, goes to the engine thread, so that decoding an arbitrary file never holds
    up the loop; none of them makes the round trip to a worker process."""
    model = RecordingModel(delay_s=0)
    kwargs = decoding_kwargs(decoding)
    batcher = DynamicBatcher(model, **kwargs, max_batch_size=8)  # type: ignore[arg-type]
    batcher.start()
    assert (await batcher.submit(np.full((1, 4), 2, np.float32)))[0][0, 0] == 8
    assert (await batcher.submit_encoded(b"3"))[0][0, 0] == 12
    assert model.threads == {threading.main_thread().name} and model.batches == [1, 1]
    large = b"0" * (INLINE_IMAGE_BYTES + 1)  # a valid stand-in image of zeros, over the inline size
    assert (await batcher.submit_encoded(large))[0][0, 0] == 0
    assert model.threads == {threading.main_thread().name, "onnx_0"} and model.batches == [1, 1, 1]
    workers = kwargs.get("workers")
    assert not (isinstance(workers, StandInWorkers) and workers.batches)
    await batcher.stop()

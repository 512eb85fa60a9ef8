"""WorkerPool: images decoded in worker processes exactly as in the service process (and, given
the model, run through it as the service process would, KServe tensors too), bad images failing
alone, and workers that die replaced without losing the batch or the service."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from services.inference.engine import OnnxModel
from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.model import ModelManifest
from services.inference.workers.pool import ModelRunFailed, WorkerCrashed, WorkerPool
from services.inference.workers.wire import WorkerModel
from tests.images import encode, fashion_images, png_declaring
from tests.support import alive

CRASH = b"crash the decoder"


@dataclass(frozen=True)
class CrashingPreprocessor(Preprocessor):
    """Kills its process on CRASH, as a decoder bug on a hostile file would (importable by the workers)."""

    def __call__(self, data: bytes) -> np.ndarray:
        if data == CRASH:
            os._exit(70)
        return super().__call__(data)


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    p = await WorkerPool.open(CrashingPreprocessor(width=28, height=28), 2, nice=3)
    try:
        yield p
    finally:
        await p.close()


def niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


async def wait_dead(pids: list[int]) -> None:
    for _ in range(200):
        if not any(alive(p) for p in pids):
            return
        await asyncio.sleep(0.05)


async def test_workers_decode_exactly_as_the_service_process(pool: WorkerPool) -> None:
    x, _ = fashion_images(20)
    photo = encode(np.kron(255 - x[0], np.ones((12, 12), np.uint8)), "JPEG", quality=90)
    images = [encode(img) for img in x] + [photo]
    here = Preprocessor(width=28, height=28)
    tensors, failed, took, compute_s = await pool.run([images])
    assert not failed and tensors is not None and len(took) == len(images) and compute_s is None
    np.testing.assert_array_equal(tensors, np.stack([here(i) for i in images]))


async def test_bad_images_fail_alone_with_the_reason(pool: WorkerPool) -> None:
    x, _ = fashion_images(3)
    good = [encode(img) for img in x]
    images = [good[0], b"", good[1], png_declaring(30000, 30000), encode(x[2])[:60], good[2]]
    tensors, failed, *_ = await pool.run([images])
    assert tensors is not None and len(tensors) == 3
    assert set(failed) == {1, 3, 4} and all(isinstance(e, ImageRejected) for e in failed.values())
    assert "0 bytes" in str(failed[1]) and "too many pixels" in str(failed[3])
    here = Preprocessor(width=28, height=28)
    np.testing.assert_array_equal(tensors, np.stack([here(g) for g in good]))


async def test_a_killed_worker_is_replaced_and_the_batch_still_answered(pool: WorkerPool) -> None:
    x, _ = fashion_images(8)
    images = [encode(img) for img in x]
    before = pool.pids
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    await wait_dead(before)
    tensors, failed, *_ = await pool.run([images])
    assert not failed and tensors is not None and len(tensors) == 8
    assert set(pool.pids) - set(before), "a new worker took the dead one's place"
    assert [niceness(p) for p in pool.pids] == [min(19, niceness(os.getpid()) + 3)] * 2, "at the pool's priority"


async def test_an_image_that_crashes_the_decoder_fails_and_the_pool_goes_on(pool: WorkerPool) -> None:
    x, _ = fashion_images(2)
    good = [encode(img) for img in x]
    tensors, failed, *_ = await pool.run([[good[0], CRASH, good[1]]])  # crashes the worker, then its replacement
    assert tensors is None and set(failed) == {0, 1, 2}
    assert all("decoder crashed" in str(e) for e in failed.values())
    tensors, failed, *_ = await pool.run([good])
    assert not failed and tensors is not None and len(tensors) == 2
    assert len(pool.pids) == 2 and all(alive(p) for p in pool.pids)


async def test_closing_the_pool_ends_the_workers() -> None:
    pool = await WorkerPool.open(Preprocessor(width=28, height=28), 2)
    pids = pool.pids
    assert all(alive(p) for p in pids)
    await pool.close()
    assert not any(alive(p) for p in pids)


async def test_a_worker_that_cannot_be_restarted_fails_the_batch_without_draining_the_pool(
        pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = fashion_images(2)
    good = [encode(img) for img in x]
    for pid in pool.pids:
        os.kill(pid, signal.SIGKILL)
    await wait_dead(pool.pids)

    def no_processes(*args: object, **kwargs: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("services.inference.workers.pool.subprocess.Popen", no_processes)
    for _ in range(3):  # more calls than workers: none may block on an empty pool
        with pytest.raises(OSError, match="temporarily unavailable"):
            await pool.run([good])
    monkeypatch.undo()
    tensors, failed, *_ = await pool.run([good])  # processes can be started again: the pool recovers
    assert not failed and tensors is not None and len(tensors) == 2


async def test_workers_given_the_model_answer_with_its_outputs(linear_model: tuple[Path, np.ndarray]) -> None:
    manifest = ModelManifest.load(linear_model[0])
    here = Preprocessor.from_manifest(manifest)
    model = OnnxModel(manifest, "cpu")
    x, _ = fashion_images(12)
    good = [encode(img) for img in x]
    tensors = np.stack([here(g) for g in good[8:]])  # a KServe request's rows
    pool = await WorkerPool.open(here, 2, WorkerModel(manifest))
    try:
        # Two requests of images (one bad image among them) around a tensor request.
        items = [[good[0], b"not an image", *good[1:4]], tensors, good[4:8]]
        outputs, failed, took, compute_s = await pool.run(items)
        assert set(failed) == {1} and isinstance(failed[1], ImageRejected) and len(took) == 9
        assert compute_s is not None and compute_s > 0
        expected = model.run(np.concatenate([np.stack([here(g) for g in good[:4]]), tensors,
                                             np.stack([here(g) for g in good[4:8]])]))
        assert outputs is not None and outputs.shape == (12, 10)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
        lone, failed, _, _ = await pool.run([[good[5]]])  # a lone image too
        assert not failed
        np.testing.assert_allclose(lone, expected[9:10], rtol=1e-5, atol=1e-6)
        rows, failed, _, compute_s = await pool.run([[b"", b"x", b"y", b"z"]])  # nothing usable: no model run
        assert rows is None and set(failed) == {0, 1, 2, 3} and compute_s is None
    finally:
        await pool.close()


async def test_a_model_that_fails_in_a_worker_fails_the_batch_and_the_pool_goes_on(
        linear_model: tuple[Path, np.ndarray]) -> None:
    manifest = ModelManifest.load(linear_model[0])
    here = Preprocessor.from_manifest(manifest)
    x, _ = fashion_images(2)
    good = [encode(img) for img in x]
    pool = await WorkerPool.open(here, 1, WorkerModel(manifest))
    try:
        wrong_shape = np.zeros((2, 1, 5, 5), np.float32)
        with pytest.raises(ModelRunFailed, match="model run failed"):
            await pool.run([good, wrong_shape])
        outputs, failed, *_ = await pool.run([good])
        assert not failed and outputs is not None and outputs.shape == (2, 10)
    finally:
        await pool.close()


async def test_workers_that_only_decode_refuse_tensors(pool: WorkerPool) -> None:
    with pytest.raises(TypeError, match="encoded images only"):
        await pool.run([np.zeros((1, 1, 28, 28), np.float32)])


async def test_a_worker_that_cannot_open_the_model_fails_the_pool_visibly(tmp_path: Path,
                                                                       linear_model: tuple[Path, np.ndarray]) -> None:
    manifest = ModelManifest.load(linear_model[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    (broken / "manifest.json").write_text((linear_model[0] / "manifest.json").read_text())
    with pytest.raises(WorkerCrashed, match="died"):
        await WorkerPool.open(Preprocessor.from_manifest(manifest), 1, WorkerModel(ModelManifest.load(broken)))


async def test_a_cancelled_batch_does_not_answer_the_next_one() -> None:
    here = Preprocessor(width=28, height=28)
    x, _ = fashion_images(6)
    photo = encode(np.kron(255 - x[0], np.ones((20, 20), np.uint8)), "PNG")  # 560 px: slow to decode
    first, second = [photo] * 40, [encode(img) for img in x[3:]]
    pool = await WorkerPool.open(here, 1)
    try:
        task = asyncio.ensure_future(pool.run([first]))
        await asyncio.sleep(0)  # written to the worker, its answer not read yet
        task.cancel()
        # The same worker, which answers `first` after this was sent: that late answer is dropped.
        tensors, failed, *_ = await pool.run([second])
        assert not failed
        np.testing.assert_array_equal(tensors, np.stack([here(i) for i in second]))
    finally:
        await pool.close()

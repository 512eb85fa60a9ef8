"""DecoderPool: images decoded in helper processes exactly as in the service process (and, given
the model, run through it as the service process would), bad images failing alone, and helpers
that die replaced without losing the batch or the service."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from services.inference.decoding import DecoderCrashed, DecoderPool, HelperModel
from services.inference.engine import OnnxModel
from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.model import ModelManifest
from tests.images import encode, fashion_images, png_declaring

CRASH = b"crash the decoder"


@dataclass(frozen=True)
class CrashingPreprocessor(Preprocessor):
    """Kills its process on CRASH, as a decoder bug on a hostile file would (importable by the helpers)."""

    def __call__(self, data: bytes) -> np.ndarray:
        if data == CRASH:
            os._exit(70)
        return super().__call__(data)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    p = DecoderPool(CrashingPreprocessor(width=28, height=28), 2)
    try:
        yield p
    finally:
        p.close()


def test_helpers_decode_exactly_as_the_service_process(pool: DecoderPool) -> None:
    x, _ = fashion_images(20)
    photo = encode(np.kron(255 - x[0], np.ones((12, 12), np.uint8)), "JPEG", quality=90)
    images = [encode(img) for img in x] + [photo]
    here = Preprocessor(width=28, height=28)
    tensors, failed, took, compute_s = pool.decode(images)
    assert not failed and tensors is not None and len(took) == len(images) and compute_s is None
    np.testing.assert_array_equal(tensors, np.stack([here(i) for i in images]))


def test_bad_images_fail_alone_with_the_reason(pool: DecoderPool) -> None:
    x, _ = fashion_images(3)
    good = [encode(img) for img in x]
    images = [good[0], b"", good[1], png_declaring(30000, 30000), encode(x[2])[:60], good[2]]
    tensors, failed, *_ = pool.decode(images)
    assert tensors is not None and len(tensors) == 3
    assert set(failed) == {1, 3, 4} and all(isinstance(e, ImageRejected) for e in failed.values())
    assert "0 bytes" in str(failed[1]) and "too many pixels" in str(failed[3])
    here = Preprocessor(width=28, height=28)
    np.testing.assert_array_equal(tensors, np.stack([here(g) for g in good]))


def test_a_killed_helper_is_replaced_and_the_batch_still_answered(pool: DecoderPool) -> None:
    x, _ = fashion_images(8)
    images = [encode(img) for img in x]
    before = pool.pids
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in before) and time.monotonic() < deadline:
        time.sleep(0.05)
    tensors, failed, *_ = pool.decode(images)
    assert not failed and tensors is not None and len(tensors) == 8
    assert set(pool.pids) - set(before), "a new helper took the dead one's place"


def test_an_image_that_crashes_the_decoder_fails_and_the_pool_goes_on(pool: DecoderPool) -> None:
    x, _ = fashion_images(2)
    good = [encode(img) for img in x]
    tensors, failed, *_ = pool.decode([good[0], CRASH, good[1]])  # crashes the helper, then its replacement
    assert tensors is None and set(failed) == {0, 1, 2}
    assert all("decoder crashed" in str(e) for e in failed.values())
    tensors, failed, *_ = pool.decode(good)
    assert not failed and tensors is not None and len(tensors) == 2
    assert len(pool.pids) == 2 and all(alive(p) for p in pool.pids)


def test_closing_the_pool_ends_the_helpers() -> None:
    pool = DecoderPool(Preprocessor(width=28, height=28), 2)
    pids = pool.pids
    assert all(alive(p) for p in pids)
    pool.close()
    assert not any(alive(p) for p in pids)


def test_a_helper_that_cannot_be_restarted_fails_the_batch_without_draining_the_pool(
        pool: DecoderPool, monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = fashion_images(2)
    good = [encode(img) for img in x]
    for pid in pool.pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pool.pids) and time.monotonic() < deadline:
        time.sleep(0.05)

    def no_processes(*args: object, **kwargs: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("services.inference.decoding._Helper.__init__", no_processes)
    for _ in range(3):  # more calls than helpers: none may block on an empty pool
        with pytest.raises(OSError, match="temporarily unavailable"):
            pool.decode(good)
    monkeypatch.undo()
    tensors, failed, *_ = pool.decode(good)  # processes can be started again: the pool recovers
    assert not failed and tensors is not None and len(tensors) == 2


def test_helpers_given_the_model_answer_with_its_outputs(linear_model: tuple[Path, np.ndarray]) -> None:
    manifest = ModelManifest.load(linear_model[0])
    here = Preprocessor.from_manifest(manifest)
    model = OnnxModel(manifest, "cpu")
    x, _ = fashion_images(12)
    good = [encode(img) for img in x]
    images = [good[0], b"not an image", *good[1:]]
    pool = DecoderPool(here, 2, HelperModel(manifest, min_batch=4))
    try:
        outputs, failed, took, compute_s = pool.decode(images)
        assert set(failed) == {1} and isinstance(failed[1], ImageRejected) and len(took) == len(images)
        assert compute_s is not None and compute_s > 0
        expected = model.run(np.stack([here(g) for g in good]))
        assert outputs is not None and outputs.shape == (12, 10)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
        rows, failed, _, compute_s = pool.decode([b"", b"x", b"y", b"z"])  # nothing usable: no model run
        assert rows is None and set(failed) == {0, 1, 2, 3} and compute_s is None
        tensors, failed, _, compute_s = pool.decode(good[:3])  # under min_batch: tensors, for the service's session
        assert not failed and compute_s is None
        np.testing.assert_array_equal(tensors, np.stack([here(g) for g in good[:3]]))
    finally:
        pool.close()


def test_a_helper_that_cannot_open_the_model_fails_the_pool_visibly(tmp_path: Path,
                                                                       linear_model: tuple[Path, np.ndarray]) -> None:
    manifest = ModelManifest.load(linear_model[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    (broken / "manifest.json").write_text((linear_model[0] / "manifest.json").read_text())
    with pytest.raises(DecoderCrashed, match="died"):
        DecoderPool(Preprocessor.from_manifest(manifest), 1, HelperModel(ModelManifest.load(broken)))

"""Preprocessing: formats, EXIF, alpha, product photos, and rejection with clear reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.inference import fashion_mnist
from services.inference.imaging import ImageRejected, Preprocessor
from tests.images import encode, fashion_images, png_declaring

pre = Preprocessor(28, 28, mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "TIFF", "WEBP"])
def test_lossless_formats_of_a_28x28_image_pass_through_unchanged(fmt: str) -> None:
    x, _ = fashion_images(1)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = pre.to_model_pixels(encode(x[0], fmt, **kw))
    assert out.shape == (28, 28)
    assert np.array_equal(out, x[0])


def test_tensor_is_normalized_nchw() -> None:
    x, _ = fashion_images(1)
    p = Preprocessor(28, 28, mean=(0.5,), std=(0.25,))
    t = p(encode(x[0]))
    assert t.shape == (1, 28, 28) and t.dtype == np.float32
    np.testing.assert_allclose(t[0], (x[0] / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_product_photo_is_mapped_to_the_dataset_convention() -> None:
    x, _ = fashion_images(20)
    rng = np.random.default_rng(1)
    correlations = []
    for img in x:
        photo = fashion_mnist.render_product_photo(img, rng)
        assert Image.open(io.BytesIO(photo)).size[0] > 150
        out = pre.to_model_pixels(photo).astype(np.float32)
        # Dark background, light item, and close to the original thumbnail (up to resampling shifts).
        frame = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]]).mean()
        original_frame = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(float).mean()
        assert frame < original_frame + 15
        correlations.append(np.corrcoef(out.ravel(), img.astype(np.float32).ravel())[0, 1])
    assert min(correlations) > 0.5 and np.mean(correlations) > 0.8, correlations


def test_draft_decoding_matches_full_decoding() -> None:
    x, _ = fashion_images(10)
    rng = np.random.default_rng(2)
    full = Preprocessor(28, 28, use_draft=False)
    diffs = []
    for img in x:
        photo = fashion_mnist.render_product_photo(img, rng)
        a, b = pre.to_model_pixels(photo).astype(float), full.to_model_pixels(photo).astype(float)
        diffs.append(np.abs(a - b).mean())
    assert np.mean(diffs) < 15, diffs


def _pillow_draft_only(p: Preprocessor) -> Preprocessor:
    """`p` with every JPEG decoded by Pillow's draft (the simplejpeg fast path turned off)."""
    object.__setattr__(p, "_jpeg_scaled", lambda img, data: None)
    return p


def _jpeg(pixels: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_the_fast_jpeg_path_gives_the_same_tensors_as_pillows_draft(color_mode: str) -> None:
    """simplejpeg decodes upright YCbCr and grayscale JPEGs at the scale Pillow's draft would choose:
    same pixels. Sizes where the two libraries' own scale rules differ (217 px: Pillow takes 1/4,
    a smallest-size-above rule 1/8) are included."""
    x, _ = fashion_images(12)
    rng = np.random.default_rng(5)
    fast = Preprocessor(28, 28, color_mode=color_mode)
    pillow = _pillow_draft_only(Preprocessor(28, 28, color_mode=color_mode))
    photos = [fashion_mnist.render_product_photo(img, rng) for img in x]
    big = np.kron(255 - x[0], np.ones((9, 9), np.uint8))  # 252 px, grayscale
    photos += [_jpeg(big), _jpeg(big[:217, :241]), _jpeg(np.dstack([big] * 3), progressive=True),
               _jpeg(np.dstack([big] * 3), subsampling=0, quality=70)]
    for photo in photos:
        assert fast._jpeg_scaled(Image.open(io.BytesIO(photo)), photo) is not None, "the fast path was taken"
        np.testing.assert_array_equal(fast(photo), pillow(photo))


def test_jpegs_the_fast_path_does_not_take_still_decode() -> None:
    """CMYK JPEGs and EXIF-rotated ones go through Pillow, with the same result as before."""
    x, _ = fashion_images(1)
    big = np.kron(255 - x[0], np.ones((9, 9), np.uint8))
    cmyk = io.BytesIO()
    Image.fromarray(big).convert("CMYK").save(cmyk, format="JPEG")
    assert pre._jpeg_scaled(Image.open(cmyk), cmyk.getvalue()) is None
    out = pre.to_model_pixels(cmyk.getvalue())
    np.testing.assert_array_equal(out, _pillow_draft_only(Preprocessor(28, 28)).to_model_pixels(cmyk.getvalue()))
    assert out.shape == (28, 28) and out.max() > 200


def test_exif_orientation_is_applied() -> None:
    # A tall white bar on black; stored rotated with EXIF orientation 6 (rotate 90 CW to view).
    pixels = np.zeros((28, 28), np.uint8)
    pixels[2:26, 12:16] = 255
    stored = np.rot90(pixels, k=1)  # what the camera wrote: a horizontal bar
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", exif=exif, quality=95)
    out = pre.to_model_pixels(buf.getvalue())
    cols = out.mean(axis=0)
    rows = out.mean(axis=1)
    assert rows.std() < cols.std(), "the bar should be upright (vertical) after EXIF rotation"


def test_alpha_is_flattened_on_white_then_inverted() -> None:
    # A fully transparent image with a black opaque square: background is white once flattened.
    rgba = np.zeros((60, 60, 4), np.uint8)
    rgba[10:50, 25:35] = (0, 0, 0, 255)  # a tall bar: the fitted frame keeps margins left and right
    out = pre.to_model_pixels(encode(rgba))
    assert out[14, 0] == 0, "white (flattened transparency) background becomes the model's black"
    assert out[14, 14] > 200, "the dark item becomes light"


def test_rgb_model_gets_three_channels() -> None:
    p = Preprocessor(32, 32, color_mode="RGB", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    rgb = np.full((50, 80, 3), 255, np.uint8)
    rgb[10:40, 10:70] = (200, 20, 20)
    t = p(encode(rgb))
    assert t.shape == (3, 32, 32)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"\x00\x01garbage" * 10, "not an image"),
    (b"%PDF-1.4 not a picture", "not an image"),
])
def test_unusable_bytes_are_rejected_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected, match=reason):
        pre(data)


def test_truncated_files_are_rejected() -> None:
    x, _ = fashion_images(1)
    big = np.asarray(Image.fromarray(x[0]).resize((300, 300)))
    for fmt in ("PNG", "JPEG"):
        data = encode(big, fmt)
        with pytest.raises(ImageRejected, match=r"truncated|corrupt"):
            pre(data[: len(data) // 2])


def test_too_many_pixels_rejected_before_decoding() -> None:
    with pytest.raises(ImageRejected, match=r"too many pixels: PNG declares 30000x30000"):
        pre(png_declaring(30000, 30000))

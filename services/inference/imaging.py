"""Image decoding and preprocessing: encoded bytes in, the model's input tensor out.

One place for everything that touches pixels, used by the service, the evaluation command and
the benchmark alike, so that what is measured is what is served.

Product photos (a dark or colored item on a white background, off-centre, a few hundred pixels)
are mapped to the model's convention (Fashion-MNIST: a light item on black filling a 28x28
frame): background detected from the border, inverted when needed, contrast stretched, cropped
to the item, fitted preserving the aspect ratio and centred. Images that already match the
model's size and background pass straight through.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from services.inference.model import ModelManifest

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's own bomb check must not fire before ours (ours names the limit in its message).
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

CONTENT_THRESHOLD = 0.12  # fraction of full scale above the background that counts as the item
_LEVELS = np.arange(256, dtype=np.float32)
_LEVELS_FLIPPED = 255 - _LEVELS
_EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """The bytes cannot be used as an image; the message says why, for the caller to read."""


@dataclass(frozen=True)
class Preprocessor:
    """Turns encoded image bytes into one normalized input tensor for the model."""

    width: int
    height: int
    color_mode: str = "L"
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    background: str = "dark"
    max_pixels: int = 40_000_000
    use_draft: bool = True
    """Decode large JPEGs at reduced scale (DCT scaling): a fraction of the cost of a full decode."""
    draft_factor: int = 1
    """JPEG draft target, as a multiple of the model's input size."""

    def __post_init__(self) -> None:
        # uint8 level -> normalized float, per channel: one table lookup normalizes an image.
        channels = 1 if self.color_mode == "L" else 3
        mean = np.broadcast_to(np.asarray(self.mean, np.float32), (channels,))
        std = np.broadcast_to(np.asarray(self.std, np.float32), (channels,))
        table = (_LEVELS[None, :] / 255 - mean[:, None]) / std[:, None]
        object.__setattr__(self, "_norm_table", table.astype(np.float32))

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, max_pixels: int = 40_000_000,
                      use_draft: bool = True) -> Preprocessor:
        return cls(width=manifest.width, height=manifest.height, color_mode=manifest.color_mode,
                   layout=manifest.layout, mean=manifest.mean, std=manifest.std,
                   background=manifest.background, max_pixels=max_pixels, use_draft=use_draft)

    def __call__(self, data: bytes) -> np.ndarray:
        return self.normalize(self.to_model_pixels(data))

    def to_model_pixels(self, data: bytes) -> np.ndarray:
        """Decoded, mapped and fitted pixels: uint8, HxW (L) or HxWx3 (RGB)."""
        img, pixels = self._decode(data)
        lum = pixels if pixels.ndim == 2 else pixels.max(axis=2)
        border = _border_level(lum)
        invert = (border > 127) == (self.background == "dark")
        if pixels.shape[:2] == (self.height, self.width) and not invert:
            return pixels
        # Work as if the model wanted a light item on black; light-background models flip at the end.
        flip = invert != (self.background == "light")
        bg = 255 - border if flip else border
        if flip:  # item darker than the background: threshold minima instead of flipping the array
            cut = border - CONTENT_THRESHOLD * max(border - float(lum.min()), 8.0)
            rows = np.flatnonzero(lum.min(axis=1) < cut)
            cols = np.flatnonzero(lum.min(axis=0) < cut)
        else:
            cut = border + CONTENT_THRESHOLD * max(float(lum.max()) - border, 8.0)
            rows = np.flatnonzero(lum.max(axis=1) > cut)
            cols = np.flatnonzero(lum.max(axis=0) > cut)
        if rows.size and cols.size:
            img = img.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
        fitted = self._fit(img, fill=round(border))
        # Stretch the item to full scale, measured after the downscale has averaged away JPEG
        # speckle (a full-resolution maximum would be set by a few outlier pixels).
        levels = _LEVELS_FLIPPED if flip else _LEVELS
        fitted_lum = fitted if fitted.ndim == 2 else fitted.max(axis=2)
        top = float(levels[fitted_lum].max())
        span = top - bg if top - bg > 8 else 255.0
        lut = np.clip((levels - bg) * (255.0 / span), 0, 255).astype(np.uint8)
        canvas = lut.take(fitted)
        return canvas if self.background == "dark" else 255 - canvas

    def decode(self, data: bytes) -> Image.Image:
        """Open, check and decode; the result is in the model's color mode, EXIF-upright."""
        return self._decode(data)[0]

    def _decode(self, data: bytes) -> tuple[Image.Image, np.ndarray]:
        """decode(), and its pixels as an array."""
        if not data:
            raise ImageRejected("empty image: 0 bytes received")
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageRejected(
                f"not an image: {len(data)} bytes in no supported format ({', '.join(ALLOWED_FORMATS)})"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"corrupt image header: {exc}") from None
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageRejected(f"invalid {img.format} image: declared size {width}x{height}")
        if width * height > self.max_pixels:
            raise ImageRejected(
                f"too many pixels: {img.format} declares {width}x{height} = {width * height:,} pixels, "
                f"over the limit of {self.max_pixels:,}"
            )
        try:
            if img.format == "JPEG" and self.use_draft:
                scaled = self._jpeg_scaled(img, data)
                if scaled is not None:
                    return Image.fromarray(scaled), scaled
                # DCT scaling to the smallest size still >= draft_factor x the model input: enough
                # detail for the crop-and-fit below, at a fraction of a full decode.
                img.draft(self.color_mode, self._draft_size)
            img.load()
            img = self._upright(img)
            img = self._to_color_mode(img)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"truncated or corrupt {img.format} data: {exc}") from None
        return img, np.asarray(img)

    def _jpeg_scaled(self, img: Image.Image, data: bytes) -> np.ndarray | None:
        """The reduced-scale decode of an upright YCbCr or grayscale JPEG by simplejpeg (the same
        libjpeg-turbo DCT scaling as Pillow's draft, at the scale Pillow would choose, so the same
        pixels), or None for the other JPEGs (CMYK, EXIF-rotated, ...), which Pillow decodes.
        Faster than Pillow's draft: it skips Pillow's Python around the decoder."""
        if img.mode not in ("L", "RGB") or self.color_mode not in ("L", "RGB") or len(img.tile) != 1 \
                or img.getexif().get(_EXIF_ORIENTATION, 1) != 1 \
                or simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray"):
            return None
        (w, h), (tw, th) = img.size, self._draft_size
        scale = next(s for s in (8, 4, 2, 1) if min(w // tw, h // th) >= s or s == 1)  # Pillow's draft rule
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if self.color_mode == "L" else "RGB",
                                        min_width=-(-w // scale), min_height=-(-h // scale))
        return pixels[:, :, 0] if self.color_mode == "L" else pixels

    @property
    def _draft_size(self) -> tuple[int, int]:
        """The smallest size a reduced-scale JPEG decode may produce: draft_factor x the model input."""
        return self.width * self.draft_factor, self.height * self.draft_factor

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (HxW or HxWxC) -> float32 tensor in the model's layout and normalization."""
        table: np.ndarray = self._norm_table  # type: ignore[attr-defined]
        if pixels.ndim == 2:
            x = table[0].take(pixels)[None]  # 1xHxW
            return x if self.layout == "NCHW" else np.ascontiguousarray(x.transpose(1, 2, 0))
        x = np.stack([table[c].take(pixels[:, :, c]) for c in range(pixels.shape[2])])  # CxHxW
        return x if self.layout == "NCHW" else np.ascontiguousarray(x.transpose(1, 2, 0))

    @staticmethod
    def _upright(img: Image.Image) -> Image.Image:
        if img.format in ("JPEG", "TIFF", "WEBP", "PNG") and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return ImageOps.exif_transpose(img)
        return img

    def _to_color_mode(self, img: Image.Image) -> Image.Image:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert("RGBA"))
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = ImageOps.autocontrast(img.convert("I").point(lambda v: v / 256).convert("L"))
        return img if img.mode == self.color_mode else img.convert(self.color_mode)

    def _fit(self, img: Image.Image, fill: int) -> np.ndarray:
        """Resize preserving aspect so the longer side fills the frame, centred on `fill`."""
        w, h = img.size
        scale = min(self.width / w, self.height / h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        if (new_w, new_h) != (w, h):
            resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
            img = img.resize((new_w, new_h), resample)
        channels = () if self.color_mode == "L" else (3,)
        canvas = np.full((self.height, self.width, *channels), fill, np.uint8)
        top, left = (self.height - new_h) // 2, (self.width - new_w) // 2
        canvas[top: top + new_h, left: left + new_w] = np.asarray(img)
        return canvas


def _border_level(lum: np.ndarray) -> float:
    """Median brightness of the one-pixel frame around the image: the background's level."""
    border = np.concatenate([lum[0], lum[-1], lum[1:-1, 0], lum[1:-1, -1]])
    k = border.size // 2
    return float(np.partition(border, k)[k])

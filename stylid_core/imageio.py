"""Safe image decoding and encoding.

Every failure becomes an ``ImageDecodeError`` carrying a pipeline ``status`` (``decode_error``, ``too_large``),
so stages turn it into an error row instead of crashing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

#: default pixel limit against decompression bombs (about 8k x 8k)
DEFAULT_MAX_PIXELS = 64_000_000
#: default byte limit for one encoded image
DEFAULT_MAX_BYTES = 50_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``status`` is the row status it maps to."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode encoded bytes into an RGB uint8 array (H, W, 3).

    EXIF orientation is applied; CMYK, 16-bit, greyscale, palette and alpha images are normalised to 8-bit RGB
    (alpha is composited on white). Images over ``max_pixels`` are refused before their pixels are decoded.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("decode_error", "empty file")
    if len(data) > max_bytes:
        raise ImageDecodeError("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and at 2x raises) on bombs; we enforce our own limit on the header's size instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
                if w == 0 or h == 0:
                    raise ImageDecodeError("decode_error", "image has zero size")
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
            img = ImageOps.exif_transpose(img)
            return _to_rgb8(img)
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageDecodeError("decode_error", f"{type(exc).__name__}: {exc}") from None


def _to_rgb8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB uint8 image (used for report thumbnails)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.LANCZOS) -> np.ndarray:
    """Resize an RGB uint8 image to ``size`` = (width, height)."""
    return np.asarray(Image.fromarray(image).resize(size, resample=resample))

"""Safe image decoding and encoding.

Every failure becomes an ``ImageDecodeError`` carrying a pipeline ``status`` (``decode_error``, ``too_large``),
so stages turn it into an error row instead of crashing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

register_heif_opener()  # HEIC/HEIF, as phones save photos (AVIF and the rest are Pillow's own)

#: default pixel limit against decompression bombs (about 8k x 8k)
DEFAULT_MAX_PIXELS = 64_000_000
#: default byte limit for one encoded image
DEFAULT_MAX_BYTES = 50_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``status`` is the row status it maps to."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES, source: str | None = None
) -> np.ndarray:
    """Decode encoded bytes into an RGB uint8 array (H, W, 3).

    JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF and HEIC/HEIF are read. EXIF orientation is applied; CMYK, 16-bit,
    greyscale, palette and alpha images are normalised to 8-bit RGB (alpha is composited on white); of an animated
    or multi-page image (GIF, WebP, APNG, TIFF) the first frame is used. Images over
    ``max_pixels`` are refused before their pixels are decoded. Error messages start with ``source`` (the URI the
    bytes came from) when given.
    """
    return decode_image_bounded(data, max_pixels, max_bytes, None, source)[0]


def decode_image_bounded(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_work_pixels: int | None = None,
    source: str | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_image``, downscaled (aspect kept) to at most ``max_work_pixels`` pixels, and the full-resolution
    (width, height) after EXIF rotation. A JPEG is decoded at a reduced DCT scale (Pillow's ``draft``), so its
    full-resolution pixels are never held in memory."""
    try:
        return _decode(data, max_pixels, max_bytes, max_work_pixels)
    except ImageDecodeError as exc:
        if source is None:
            raise
        raise ImageDecodeError(exc.status, f"{source}: {exc}") from None


def work_size(width: int, height: int, max_work_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_work_pixels`` pixels (unchanged when it fits)."""
    if not max_work_pixels or width * height <= max_work_pixels:
        return width, height
    scale = (max_work_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def _decode(
    data: bytes, max_pixels: int, max_bytes: int, max_work_pixels: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
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
                rotated = img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
                source = (h, w) if rotated else (w, h)
                target = work_size(w, h, max_work_pixels)
                if target != (w, h) and img.format == "JPEG":
                    img.draft("RGB", target)  # DCT scaling: decodes at 1/2, 1/4 or 1/8, never below target
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
            img = ImageOps.exif_transpose(img)
            out = _to_rgb8(img)
            final = work_size(*source, max_work_pixels)
            if (out.shape[1], out.shape[0]) != final:
                out = resize(out, final)
            return out, source
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        # Pillow's message names its BytesIO object; say what kind of bytes they are, never the bytes themselves
        # (a token or password file given as an image must not reach the error column)
        raise ImageDecodeError(
            "decode_error", f"not an image in a known format ({len(data)} bytes of {_byte_kind(data)})"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageDecodeError("decode_error", f"{type(exc).__name__}: {exc}") from None


_ORIENTATION = 0x0112


def _byte_kind(data: bytes) -> str:
    """A coarse kind for bytes that are not an image: ``markup`` (HTML/XML), ``text`` or ``binary data``."""
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    if not all(c.isprintable() or c in "\r\n\t" for c in text):
        return "binary data"
    return "markup" if text.lstrip().startswith("<") else "text"


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


#: zlib level of written PNGs: lossless at any level; 3 is about as small as 6 on photos and faster
PNG_COMPRESS_LEVEL = 3


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image. Encoded by OpenCV (libpng): the same pixels as Pillow's encoder, about
    2.5x faster on small images (0.06 against 0.15 ms for 32 px, ``benchmarks/bench_scale.py stages``)."""
    import cv2

    rgb = np.asarray(image, dtype=np.uint8)
    if rgb.ndim == 3 and rgb.shape[2] in (3, 4):  # OpenCV's order is BGR(A)
        rgb = rgb[..., [2, 1, 0, 3][: rgb.shape[2]]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESS_LEVEL])
    if not ok:
        raise ValueError(f"PNG encode failed for an image of shape {rgb.shape}")
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB uint8 image (used for report thumbnails)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.LANCZOS) -> np.ndarray:
    """Resize an RGB uint8 image to ``size`` = (width, height)."""
    return np.asarray(Image.fromarray(image).resize(size, resample=resample))

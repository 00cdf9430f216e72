"""The bad- and odd-input corpus, built at test time under ``tests/data/bad/`` (never committed: no binary fixtures).

``build_bad_corpus()`` writes every case once (files are rebuilt when missing) and returns them by name, each with
the ``status`` its row must end with through the stages of the default config, and what ``decode_image`` must do
with it. Cases that need a face use a downscaled real portrait from the bundled sample, so "ok" means the image
was decoded the right way up and in the right colours well enough for dlib to find the face.

Two kinds need storage rather than a file and are only rows of a manifest: a missing URI (``missing``) and a URI
that storage refuses (``forbidden``; an S3 bucket policy denying ``GetObject``: permissions mean nothing to root on
a local disk).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stylid_core.sample_data import background, load_photo, place_face

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bad")
#: the largest N faces kept per image in the hundreds-of-faces case (``faces.max_faces``, to keep tests short)
MANY_FACES_KEPT = 8


@dataclass(frozen=True)
class BadInput:
    """One corpus file: its path, the final row ``status`` through the stages, and ``decoded``: the (height,
    width) ``decode_image`` must give, or None when decoding must fail with ``status``."""

    name: str
    path: str
    status: str
    decoded: tuple[int, int] | None
    note: str


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def portrait(side: int = 200) -> Image.Image:
    """Obama's bundled portrait, longer side ``side`` px (a face dlib finds at the default settings)."""
    img = Image.fromarray(load_photo("obama"))
    scale = side / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few hundred bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)  # far too little data for the claimed size
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def many_faces(face_px: int = 32, cols: int = 15, rows: int = 12) -> Image.Image:
    """``cols`` x ``rows`` real faces of ``face_px`` on a face-free background (180 by default)."""
    cell_w, cell_h = round(3.25 * face_px), round(4.0 * face_px)
    scene = background(cols * cell_w, rows * cell_h).copy()
    stems = ("obama", "biden", "grace_hopper", "obama2")
    for r in range(rows):
        for c in range(cols):
            place_face(scene, stems[(r * cols + c) % len(stems)], face_px, (c * cell_w + cell_w // 2,
                                                                              r * cell_h + round(0.42 * cell_h)))
    return Image.fromarray(scene)


def animated_gif() -> bytes:
    """Two frames: the portrait first, then flat grey (decoding must use the first frame)."""
    face = portrait()
    grey = Image.new("RGB", face.size, (128, 128, 128))
    return _encode(face, "GIF", save_all=True, append_images=[grey], duration=100, loop=0)


def _exif(img: Image.Image, orientation: int) -> bytes:
    """``img`` stored rotated so that applying EXIF ``orientation`` (6 or 8) shows it upright again."""
    stored = img.transpose(Image.ROTATE_90 if orientation == 6 else Image.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def multipage_tiff() -> bytes:
    """Two pages: the portrait first, then flat grey (decoding must use the first page)."""
    face = portrait()
    grey = Image.new("RGB", face.size, (128, 128, 128))
    return _encode(face, "TIFF", save_all=True, append_images=[grey])


def rgb16_png(img: Image.Image) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow reads but does not write."""
    import cv2

    bgr16 = np.asarray(img.convert("RGB"), dtype=np.uint16)[..., ::-1] * 257
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr16))
    assert ok
    return buf.tobytes()


def heic(img: Image.Image) -> bytes:
    """HEIC, as phones save photos (pillow-heif's encoder)."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    return _encode(img, "HEIF", quality=90)


def _cases() -> dict[str, tuple[bytes, str, tuple[int, int] | None, str]]:
    face = portrait()
    h, w = face.height, face.width
    jpeg = _encode(face, "JPEG", quality=92)
    png = _encode(face, "PNG")
    grey16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    la = face.convert("LA")
    la.putalpha(Image.fromarray(np.where(np.arange(w)[None, :].repeat(h, 0) < 8, 0, 255).astype(np.uint8)))
    palette = face.quantize(colors=255)
    pal = np.asarray(palette).copy()
    pal[:, :6] = 255  # a transparent band on the left, on palette index 255
    palette = Image.fromarray(pal, "P")
    palette.putpalette(face.quantize(colors=255).getpalette()[: 255 * 3] + [0, 255, 0])
    rng = np.random.default_rng(0)
    return {
        "truncated_jpeg_10pct.jpg": (jpeg[: len(jpeg) // 10], "decode_error", None, "JPEG cut at 10%"),
        "truncated_jpeg_50pct.jpg": (jpeg[: len(jpeg) // 2], "decode_error", None, "JPEG cut at 50%"),
        "truncated_jpeg_95pct.jpg": (jpeg[: len(jpeg) * 95 // 100], "decode_error", None, "JPEG cut at 95%"),
        "truncated_png_50pct.png": (png[: len(png) // 2], "decode_error", None, "PNG cut inside IDAT"),
        "truncated_header.png": (png[:20], "decode_error", None, "PNG cut inside its header"),
        "page.html.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>\n", "decode_error", None,
                          "an HTML error page saved under an image name"),
        "random_bytes.jpg": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "decode_error", None,
                             "random bytes"),
        "empty.jpg": (b"", "decode_error", None, "zero bytes"),
        "cmyk.jpg": (_encode(face.convert("CMYK"), "JPEG", quality=95), "ok", (h, w), "CMYK JPEG -> RGB"),
        "grey16.png": (_encode(grey16, "PNG"), "ok", (h, w), "16-bit greyscale PNG -> 8-bit RGB"),
        "la.png": (_encode(la, "PNG"), "ok", (h, w), "greyscale + alpha, composited on white"),
        "palette_transparent.png": (_encode(palette, "PNG", transparency=255), "ok", (h, w),
                                    "palette PNG with a transparent index, composited on white"),
        "animated.gif": (animated_gif(), "ok", (h, w), "animated GIF: the first frame (the face) is used"),
        "portrait.webp": (_encode(face, "WEBP", quality=90), "ok", (h, w), "WebP"),
        "portrait.tiff": (_encode(face, "TIFF", compression="tiff_lzw"), "ok", (h, w), "LZW TIFF"),
        "exif6.jpg": (_exif(face, 6), "ok", (h, w), "EXIF orientation 6: stored sideways, shown upright"),
        "exif8.jpg": (_exif(face, 8), "ok", (h, w), "EXIF orientation 8: stored sideways, shown upright"),
        "bomb_header.png": (png_header_only(100_000, 100_000), "too_large", None,
                            "claims 10 G pixels in a few hundred bytes: refused before decoding"),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), (200, 150, 120)), "PNG"), "no_face", (1, 1), "1x1"),
        "strip_20000x20.png": (_encode(Image.new("RGB", (20000, 20), (90, 120, 150)), "PNG"), "no_face", (20, 20000),
                               "a 20000 x 20 strip"),
        "many_faces.jpg": (_encode(many_faces(), "JPEG", quality=92), "ok", None,
                           f"180 faces: detected, the largest {MANY_FACES_KEPT} kept (faces.max_faces)"),
        "no_face.jpg": (_encode(Image.fromarray(background(320, 240)), "JPEG", quality=90), "no_face", (240, 320),
                        "a room, nobody in it"),
        "portrait-ñ-日本-😀.jpg": (jpeg, "ok", (h, w), "a unicode file name"),
        # the formats and variants that many teams' datasets hold besides (docs/inputs.md)
        "portrait.heic": (heic(face), "ok", (h, w), "HEIC, as phones save photos"),
        "portrait.avif": (_encode(face, "AVIF", quality=90), "ok", (h, w), "AVIF"),
        "progressive.jpg": (_encode(face, "JPEG", quality=90, progressive=True), "ok", (h, w), "progressive JPEG"),
        "multipage.tiff": (multipage_tiff(), "ok", (h, w), "two-page TIFF: the first page (the face) is used"),
        "rgb16.png": (rgb16_png(face), "ok", (h, w), "48-bit RGB PNG -> 8-bit RGB"),
        "rgba.png": (_encode(face.convert("RGBA"), "PNG"), "ok", (h, w), "RGBA PNG, composited on white"),
        "portrait.bmp": (_encode(face, "BMP"), "ok", (h, w), "BMP"),
        "trailing_bytes.jpg": (jpeg + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), "ok", (h, w),
                               "a JPEG with 2,000 bytes of junk after its end marker"),
        "drawing.svg.jpg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "decode_error",
                            None, "an SVG (vector; not decoded) under an image name"),
        "document.pdf.jpg": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
                             "decode_error", None, "a PDF under an image name"),
    }  # fmt: skip


def build_bad_corpus(directory: str = CORPUS_DIR) -> dict[str, BadInput]:
    """Write the corpus into ``directory`` (files already there are kept) and return it by file name."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name, (data, status, decoded, note) in _cases().items():
        path = os.path.join(directory, name)
        if not os.path.exists(path) or os.path.getsize(path) != len(data):
            tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        if name == "many_faces.jpg":
            decoded = Image.open(path).size[::-1]
        out[name] = BadInput(name, path, status, decoded, note)
    return out

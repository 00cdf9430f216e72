"""Safe decoding: every bad input kind maps to the right row status, every odd format to 8-bit RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from stylid_core.imageio import ImageDecodeError, decode_image


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb(h=40, w=60) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 4 % 256, yy * 6 % 256, np.full_like(xx, 128)], axis=2).astype(np.uint8)


def _status(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return info.value.status


def test_good_jpeg_and_png_decode_to_rgb8():
    png = decode_image(_encode(Image.fromarray(_rgb()), "PNG"))
    assert png.shape == (40, 60, 3) and png.dtype == np.uint8
    assert np.array_equal(png, _rgb())
    jpg = decode_image(_encode(Image.fromarray(_rgb()), "JPEG", quality=95))
    assert jpg.shape == (40, 60, 3) and jpg.dtype == np.uint8


def test_truncated_jpeg_is_a_decode_error():
    data = _encode(Image.fromarray(_rgb(200, 200)), "JPEG")
    assert _status(data[: len(data) // 3]) == "decode_error"


def test_random_bytes_are_a_decode_error():
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert _status(data) == "decode_error"
    assert _status(b"<html>not an image</html>") == "decode_error"


def test_empty_bytes_are_a_decode_error():
    assert _status(b"") == "decode_error"


def test_cmyk_jpeg_becomes_rgb():
    rgb = Image.fromarray(np.full((30, 20, 3), (200, 40, 40), np.uint8))
    data = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (30, 20, 3) and out.dtype == np.uint8
    assert np.abs(out.reshape(-1, 3).mean(axis=0) - (200, 40, 40)).max() < 12


def test_16_bit_png_becomes_8_bit_rgb():
    ramp = (np.arange(64, dtype=np.uint16)[None, :] * 1040).repeat(8, axis=0)  # 0 .. 65520
    img = Image.fromarray(ramp)
    data = _encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.shape == (8, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    expected = np.round(ramp[0] / 65535 * 255)
    assert np.abs(out[0, :, 0].astype(int) - expected).max() <= 1
    assert out[0, 0, 0] == 0 and out[0, -1, 0] >= 250


def test_rgba_png_is_composited_on_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :5, 3] = 255  # left half opaque, right half transparent
    rgba[:, 5:, 3] = 0
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.shape == (10, 10, 3)
    assert (out[:, :5] == (255, 0, 0)).all()
    assert (out[:, 5:] == (255, 255, 255)).all()


def test_half_transparent_alpha_blends_with_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 128  # black at half opacity
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.abs(out.astype(int) - 127).max() <= 1


def test_palette_png_with_transparency_is_composited_on_white():
    img = Image.new("P", (8, 6))
    img.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    px = np.zeros((6, 8), np.uint8)
    px[:, 4:] = 1
    img.putdata(px.ravel().tolist())
    data = _encode(img, "PNG", transparency=1)  # index 1 (green) is fully transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = decode_image(data)
    assert out.shape == (6, 8, 3)
    assert (out[:, :4] == (0, 0, 255)).all()
    assert (out[:, 4:] == (255, 255, 255)).all()


def test_greyscale_becomes_three_equal_channels():
    grey = (np.arange(50, dtype=np.uint8)[None, :] * 5).repeat(7, axis=0)
    out = decode_image(_encode(Image.fromarray(grey, "L"), "PNG"))
    assert out.shape == (7, 50, 3) and out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(out[..., c], grey)


def test_exif_orientation_is_applied():
    img = Image.fromarray(_rgb(40, 60))  # 60 wide, 40 tall
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _encode(img, "PNG", exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (60, 40, 3)  # width and height swapped
    # orientation 6: the stored top-left pixel is shown at the top-right
    assert tuple(out[0, -1]) == (255, 0, 0)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)  # far too little data for the claimed size
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_header_is_too_large_before_decoding():
    data = _png_header_only(100_000, 100_000)  # 10 G pixels claimed in a few hundred bytes
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.status == "too_large"
    assert "pixels" in str(info.value)


def test_big_but_compressible_image_over_max_pixels_is_too_large():
    data = _encode(Image.new("RGB", (3000, 3000), (10, 20, 30)), "PNG")
    assert len(data) < 200_000
    assert _status(data, max_pixels=1_000_000) == "too_large"
    assert decode_image(data, max_pixels=9_000_000).shape == (3000, 3000, 3)


def test_over_max_bytes_is_too_large():
    data = _encode(Image.fromarray(_rgb()), "PNG")
    assert _status(data, max_bytes=len(data) - 1) == "too_large"
    assert decode_image(data, max_bytes=len(data)).shape == (40, 60, 3)


# -- the bad-input corpus (tests/bad_inputs.py builds it under tests/data/bad/) --------------------------------------


@pytest.fixture(scope="module")
def corpus():
    from tests.bad_inputs import build_bad_corpus

    return build_bad_corpus()


def test_every_corpus_file_decodes_or_fails_as_its_case_says_naming_its_source(corpus):
    for case in corpus.values():
        with open(case.path, "rb") as f:
            data = f.read()
        if case.decoded is None:
            with pytest.raises(ImageDecodeError) as info:
                decode_image(data, source=case.path)
            assert info.value.status == case.status, case
            assert str(info.value).startswith(f"{case.path}: "), str(info.value)
            assert "BytesIO" not in str(info.value)  # Pillow's "cannot identify image file <_io.BytesIO ...>"
        else:
            out = decode_image(data, source=case.path)
            assert out.shape == (*case.decoded, 3) and out.dtype == np.uint8, (case.name, out.shape)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float).mean(axis=2).ravel(), b.astype(float).mean(axis=2).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_corpus_images_come_out_upright_and_from_the_first_frame(corpus):
    from tests.bad_inputs import portrait

    upright = np.asarray(portrait())
    for name in ("exif6.jpg", "exif8.jpg", "animated.gif", "cmyk.jpg", "portrait.webp", "portrait.tiff", "grey16.png"):
        with open(corpus[name].path, "rb") as f:
            out = decode_image(f.read())
        assert _corr(out, upright) > 0.95, name  # the same picture, the right way up
    # animated GIF: frame 0 (the portrait), not the flat grey frame 1
    with open(corpus["animated.gif"].path, "rb") as f:
        assert decode_image(f.read()).std() > 20


def test_an_unidentified_format_says_what_kind_of_bytes_without_quoting_them():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"<html>nope</html>", source="s3://b/k.jpg")
    assert str(info.value) == "s3://b/k.jpg: not an image in a known format (17 bytes of markup)"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"hf_SEKRETabcdefg\n", source="token.jpg")
    assert "SEKRET" not in str(info.value) and str(info.value).endswith("(17 bytes of text)")


def test_encode_png_is_lossless_and_keeps_channel_order():
    from stylid_core.imageio import encode_png

    rgb = _rgb()
    rgb[0, 0] = (255, 0, 0)  # pure red stays red (OpenCV's own order is BGR)
    back = decode_image(encode_png(rgb))
    assert back.dtype == np.uint8 and np.array_equal(back, rgb)
    assert tuple(back[0, 0]) == (255, 0, 0)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb[..., 0])))), rgb[..., 0])

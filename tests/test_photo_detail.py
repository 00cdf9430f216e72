"""The detail judge: whose detail a face carries, the photo's or the painting's (stylid_core.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stylid_core.metrics import photo_detail_correlation
from stylid_core.sample_data import default_style_path, face_boxes, load_photo
from stylid_core.stylize.classical import ClassicalStylizer

STEM = "obama"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_photo(STEM)


def _box() -> tuple[float, float, float, float]:
    return tuple(float(v) for v in face_boxes()[STEM])


def test_a_copy_of_the_photo_is_one_and_a_restyled_face_is_lower(photo):
    box = _box()
    copy = photo_detail_correlation(photo.copy(), photo, box)
    assert copy.fine == pytest.approx(1.0) and copy.mid == pytest.approx(1.0)
    stylized = ClassicalStylizer().stylize(photo, np.asarray(Image.open(default_style_path()).convert("RGB")))
    plain = photo_detail_correlation(stylized, photo, box)
    assert plain.fine is not None and plain.mid is not None
    assert plain.fine < 0.9 and plain.mid < 0.99


def test_a_constant_image_or_an_empty_box_is_null(photo):
    flat = np.full_like(photo, 128)
    got = photo_detail_correlation(flat, photo, _box())
    assert got.fine is None and got.mid is None
    assert photo_detail_correlation(photo, photo, (10, 10, 10.5, 10.5)).fine is None


def test_an_output_of_another_size_is_compared_at_its_own_box(photo):
    h, w = photo.shape[:2]
    half = np.asarray(Image.fromarray(photo).resize((w // 2, h // 2), Image.LANCZOS))
    box = _box()
    got = photo_detail_correlation(half, photo, box, tuple(v / 2 for v in box))
    shifted = photo_detail_correlation(half, photo, box, tuple(v / 2 + 15 for v in box))
    assert got.mid > 0.9 and got.mid > shifted.mid + 0.2

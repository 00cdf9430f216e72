"""The learned style distance (``stylid_core.style_judge``) on real photos and a real painting: a painted image is
nearer the painting than the photo, and a photo only recoloured towards the painting is not (the Lab colour
distance, which it replaces as the style figure, calls that recolouring the nearest of the three)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylid_core.metrics import colour_distance
from stylid_core.style_judge import StyleJudge
from stylid_core.stylize import STYLIZERS

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
pytestmark = pytest.mark.skipif(
    not (SHARED / "styles" / "starry_night.jpg").is_file() or not (SHARED / "faces" / "scenes").is_dir(),
    reason=f"the shared paintings and scenes are not at {SHARED} (a fresh clone beside no ../shared)",
)


@pytest.fixture(scope="module")
def judge() -> StyleJudge:
    return StyleJudge()


def _rgb(path: Path, side: int = 320) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    image.thumbnail((side, side))
    return np.asarray(image)


def test_painted_is_nearer_the_painting_than_the_photo_and_its_recolouring(judge):
    style = _rgb(SHARED / "styles" / "starry_night.jpg", 512)
    photos = sorted((SHARED / "faces" / "scenes").glob("*.jpg"))[:3]
    assert photos
    neural, recolour = STYLIZERS.create("neural"), STYLIZERS.create("classical")
    for path in photos:
        photo = _rgb(path)
        painted, recoloured = neural.stylize(photo, style), recolour.stylize(photo, style)
        d_photo, d_recol, d_painted = (judge.distance(x, style) for x in (photo, recoloured, painted))
        assert d_painted < d_recol < d_photo, (path.name, d_photo, d_recol, d_painted)
        assert d_painted < 0.6 * d_recol
        # the colour figure cannot see it: the recoloured photo is at least as near as the painting's
        assert colour_distance(recoloured, style) < 1.5 * colour_distance(painted, style)


def test_the_vector_covers_a_wide_image_and_the_style_vector_is_cached(judge):
    rng = np.random.default_rng(0)
    wide = np.concatenate([np.full((100, 100, 3), 128, np.uint8), rng.integers(0, 256, (100, 200, 3), np.uint8)], 1)
    v = judge.vector(wide)
    assert v.shape == (100,) and np.isfinite(v).all()
    # a centre crop alone would miss the flat left third; the mean over three squares does not
    assert not np.allclose(v, judge.vector(wide[:, 100:200]))
    assert judge.style_vector(wide) is judge.style_vector(wide.copy())
    with pytest.raises(ValueError, match="empty"):
        judge.vector(np.zeros((0, 5, 3), np.uint8))

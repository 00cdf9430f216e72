"""The mosaic's per-face closed loop (``stylize.mosaic.identity_loop``): the choice rule, the loop end to end with a
fake engine and a fake recognizer built here (the most stylized candidate that reaches the target is chosen, the
nearest under the cap where none does, the first where none is under the cap, and what was chosen is recorded),
and that the option round-trips through the config."""

from __future__ import annotations

import numpy as np
import pytest

from stylid_core.config import ConfigError, IdentityLoopConfig, JobConfig, MosaicConfig
from stylid_core.faces import Face
from stylid_core.faces.base import FaceAnalyzer
from stylid_core.stylize.base import Stylizer
from stylid_core.stylize.mosaic import LoopCandidate, MosaicRestorer, choose_candidate

FACE = (40.0, 40.0, 64.0, 64.0)  # a 24 px face in a 160 x 120 image
BRIGHT = 200.0


class FadingEngine(Stylizer):
    """Paints towards black: an input rendered at face style strength ``s`` is ``(1 - s) * content``, at full
    style (no override) black. Records the overrides it was asked for."""

    name = "fading"
    accepts_content_region = True
    accepts_face_style_overrides = True

    def __init__(self, overrides: bool = True) -> None:
        self.accepts_face_style_overrides = overrides
        self.calls: list[list] = []

    def stylize_batch(self, contents, styles, faces=None, content_regions=None, face_style_overrides=None):
        overrides = face_style_overrides or [None] * len(contents)
        self.calls.append(list(overrides))
        outs = []
        for content, s in zip(contents, overrides):
            t = 1.0 if s is None else float(s)
            outs.append(np.clip(content.astype(np.float32) * (1.0 - t) + 0.5, 0, 255).astype(np.uint8))
        return outs


class BrightnessRecognizer(FaceAnalyzer):
    """An 'identity' that is the mean brightness of a small patch at the keypoints' centre: its distance to the
    source face is the brightness lost."""

    name = "brightness"
    embedding_dim = 1
    match_threshold = 50.0

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, image):  # pragma: no cover - not used by the loop
        return []

    def embed(self, image, keypoints):
        self.calls += 1
        out = []
        for kps in keypoints:
            cx, cy = np.asarray(kps, np.float64).mean(axis=0)
            patch = image[int(cy) - 3 : int(cy) + 3, int(cx) - 3 : int(cx) + 3]
            out.append([float(patch.mean())])
        return np.asarray(out, np.float32)


def _scene() -> tuple[np.ndarray, list[Face]]:
    image = np.full((120, 160, 3), 40, np.uint8)
    x0, y0, x1, y1 = (int(v) for v in FACE)
    image[y0:y1, x0:x1] = int(BRIGHT)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    kps = np.array([[cx - 4, cy - 3], [cx + 4, cy - 3], [cx, cy], [cx - 3, cy + 4], [cx + 3, cy + 4]], np.float32)
    return image, [Face(box=FACE, keypoints=kps, score=1.0)]


def _restorer(engine: Stylizer, recognizer: FaceAnalyzer, **loop) -> MosaicRestorer:
    cfg = MosaicConfig(max_face_px=64, target_face_px=48, identity_loop=IdentityLoopConfig(enabled=True, **loop))
    return MosaicRestorer(engine, cfg, recognizer=recognizer)


def _centre(image: np.ndarray) -> float:
    x0, y0, x1, y1 = (int(v) for v in FACE)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    return float(image[cy - 3 : cy + 3, cx - 3 : cx + 3].mean())


# -- the rule -------------------------------------------------------------------------------------------------------
def test_choice_is_the_most_stylized_candidate_that_reaches_the_target_under_the_cap():
    cands = [LoopCandidate(0.7, 0.0, 0.50, 0.80), LoopCandidate(0.4, 0.0, 0.30, 0.85),
             LoopCandidate(0.4, 0.5, 0.08, 0.87), LoopCandidate(0.4, 1.0, 0.05, 0.95)]  # fmt: skip
    # plain's distance 1.0, target 0.6: distance <= 0.4 -> the second (the third and fourth are nearer but less
    # stylized)
    assert choose_candidate(cands, 1.0, 0.6, 0.88) == (1, "target")
    # target 0.9 (distance <= 0.1): the third; the fourth is nearer still but above the cap
    assert choose_candidate(cands, 1.0, 0.9, 0.88) == (2, "target")
    # target 0.99 reached by none under the cap: the nearest under the cap (not the fourth, a copy)
    assert choose_candidate(cands, 1.0, 0.99, 0.88) == (2, "cap")
    # a cap none is under: the first, the most stylized
    assert choose_candidate(cands, 1.0, 0.5, 0.5) == (0, "first")
    # a candidate without detail in the band (fine None) counts as under the cap
    assert choose_candidate([LoopCandidate(0.7, 0.0, 0.2, None)], 1.0, 0.5, 0.5) == (0, "target")
    with pytest.raises(ValueError):
        choose_candidate([], 1.0, 0.5, 0.5)


# -- the loop end to end ------------------------------------------------------------------------------------------
def test_loop_picks_the_most_stylized_strength_that_reaches_the_target_and_records_it():
    image, faces = _scene()
    engine, recognizer = FadingEngine(), BrightnessRecognizer()
    restorer = _restorer(engine, recognizer, strengths=[0.9, 0.7, 0.45, 0.2], target=0.5, detail_cap=1.0)
    out = restorer.stylize(image, image, faces)
    # one engine call: the image (its own style) and one copy of the sheet per strength
    assert len(engine.calls) == 1 and engine.calls[0] == [None, 0.9, 0.7, 0.45, 0.2]
    # plain (black) lost 200 of the brightness; the target wants <= 100 lost: 0.45 (90 lost) is the first
    choice = restorer.last_choices[0][0]
    assert choice.strength == pytest.approx(0.45) and choice.detail == 0.0 and choice.reason == "target"
    assert choice.index == 2
    assert choice.plain_distance == pytest.approx(BRIGHT, abs=2)
    assert choice.distance == pytest.approx(0.45 * BRIGHT, abs=3)
    assert _centre(out) == pytest.approx(0.55 * BRIGHT, abs=3)  # the output is that candidate, restored
    assert recognizer.calls == 1  # every candidate, plain and the source face in one recognizer call


def test_loop_falls_back_to_the_nearest_under_the_cap_then_to_the_first():
    image, faces = _scene()
    # a target no strength reaches (lose <= 2): the nearest, the weakest strength
    restorer = _restorer(FadingEngine(), BrightnessRecognizer(), strengths=[0.9, 0.7, 0.45], target=0.99,
                         detail_cap=1.0)  # fmt: skip
    out = restorer.stylize(image, image, faces)
    choice = restorer.last_choices[0][0]
    assert (choice.strength, choice.reason) == (pytest.approx(0.45), "cap")
    assert _centre(out) == pytest.approx(0.55 * BRIGHT, abs=3)
    # the fading engine's faces are the photo's detail scaled (fine correlation 1.0): a cap of 0.88 leaves none
    # under it, and the loop keeps the most stylized
    restorer = _restorer(FadingEngine(), BrightnessRecognizer(), strengths=[0.9, 0.7, 0.45], target=0.5)
    textured = image.copy()
    textured[40:64, 40:64] = np.where(np.indices((24, 24)).sum(axis=0)[..., None] % 2 == 0, 230, 170)
    out = restorer.stylize(textured, textured, faces)
    choice = restorer.last_choices[0][0]
    assert (choice.strength, choice.reason) == (pytest.approx(0.9), "first")
    assert choice.fine is not None and choice.fine > 0.88


def test_loop_detail_steps_come_after_the_strengths_and_record_their_amount():
    image, faces = _scene()
    # one strength, a target it misses, detail steps after it; with a cap of 1.0 the nearest is chosen, which the
    # brightness recognizer cannot tell apart from the others by much: the test is what the ladder holds
    restorer = _restorer(FadingEngine(), BrightnessRecognizer(), strengths=[0.5], detail=[0.5, 1.0], target=0.9,
                         detail_cap=1.0)  # fmt: skip
    restorer.stylize(image, image, faces)
    choice = restorer.last_choices[0][0]
    assert choice.strength == pytest.approx(0.5) and choice.detail in (0.0, 0.5, 1.0) and choice.reason == "cap"


def test_engine_without_overrides_gives_one_rendering_and_no_strength():
    image, faces = _scene()
    engine = FadingEngine(overrides=False)
    restorer = _restorer(engine, BrightnessRecognizer(), target=0.5, detail_cap=1.0)
    restorer.stylize(image, image, faces)
    assert engine.calls[0] == [None, None]  # the image and its sheet, the engine's own way
    assert restorer.last_choices[0][0].strength is None


def test_loop_off_changes_nothing():
    image, faces = _scene()
    on_cfg = MosaicConfig(max_face_px=64, target_face_px=48)
    restorer = MosaicRestorer(FadingEngine(), on_cfg)
    restorer.stylize(image, image, faces)
    assert restorer.last_choices == [{}]


# -- config -----------------------------------------------------------------------------------------------------
def test_identity_loop_round_trips_through_the_config():
    loop = {"enabled": True, "target": 0.7, "strengths": [0.7, 0.5], "detail": [0.25], "detail_cap": 0.85}
    cfg = JobConfig.from_dict({"stylize": {"mosaic": {"identity_loop": loop}}})
    assert cfg.stylize.mosaic.identity_loop == IdentityLoopConfig(**loop)
    again = JobConfig.from_dict(cfg.to_dict())
    assert again.stylize.mosaic.identity_loop == cfg.stylize.mosaic.identity_loop
    assert again.config_hash() == cfg.config_hash() != JobConfig().config_hash()
    assert JobConfig().stylize.mosaic.identity_loop.enabled is False


@pytest.mark.parametrize(
    "loop",
    [{"target": 0}, {"strengths": []}, {"strengths": [1.5]}, {"detail": [0]}, {"detail_cap": 0}, {"bogus": 1}],
)
def test_identity_loop_bad_values_fail_at_start(loop):
    with pytest.raises(ConfigError):
        JobConfig.from_dict({"stylize": {"mosaic": {"identity_loop": loop}}})


def test_identity_loop_needs_the_sheet_layout():
    with pytest.raises(ConfigError, match="layout"):
        JobConfig.from_dict({"stylize": {"mosaic": {"layout": "canvas", "identity_loop": {"enabled": True}}}})


# -- the neural engine's overrides -------------------------------------------------------------------------------
def test_neural_face_style_override_renders_the_whole_input_at_that_face_style():
    from stylid_core.sample_data import load_photo
    from stylid_core.stylize import STYLIZERS

    engine = STYLIZERS.create("neural", threads=2)
    assert engine.accepts_face_style_overrides
    style = load_photo("style_painting")
    image = np.ascontiguousarray(load_photo("style_painting")[:96, :128][:, ::-1])
    plain = engine.stylize_batch([image], [style])[0]
    weaker = STYLIZERS.create("neural", threads=2, style_strength=0.4).stylize_batch([image], [style])[0]
    # one call: the image as usual, the same array at override 1.0 (the image's style) and at 0.4 (style strength
    # 1.0 x 0.4), faces ignored where an override is given
    face = Face(box=(30.0, 30.0, 60.0, 60.0), keypoints=np.zeros((5, 2), np.float32), score=1.0)
    outs = engine.stylize_batch([image, image, image], [style] * 3, [[], [face], [face]],
                                face_style_overrides=[None, 1.0, 0.4])  # fmt: skip
    assert np.array_equal(outs[0], plain)
    assert np.abs(outs[1].astype(int) - plain.astype(int)).max() <= 1
    assert np.abs(outs[2].astype(int) - weaker.astype(int)).max() <= 1
    assert np.abs(outs[2].astype(int) - plain.astype(int)).mean() > 2  # a weaker style is another rendering


# -- stylid run's stages record the choice per face row ---------------------------------------------------------
def test_stages_record_the_loops_choice_per_face(tmp_path):
    import json

    import pandas as pd
    from PIL import Image

    from pipelines.stages import FaceStage, LoadStage, ScoreStage, StylizeStage, prepare_rows
    from stylid_core.sample_data import build_scene

    scene, _ = build_scene([("grace_hopper", 40), ("obama2", 56)], width=320, height=200)
    Image.fromarray(scene).save(tmp_path / "scene.png")
    loop = {"identity_loop": {"enabled": True}}
    config = JobConfig.from_dict({"faces": {"upsample": 1}, "stylize": {"options": {"threads": 2}, "mosaic": loop}})
    rows = prepare_rows(pd.DataFrame({"image_id": ["scene"], "image_uri": [str(tmp_path / "scene.png")]}), None)
    loaded = LoadStage(config.io)(rows).to_pandas()
    found = FaceStage(config.faces)(loaded).to_pandas()
    stylized = StylizeStage(config.stylize, config.score, config.io, config.faces)(found).to_pandas()
    scored = ScoreStage(config.faces, config.score, config.io)(stylized).to_pandas()
    assert scored.at[0, "status"] == "ok"
    records = json.loads(scored.at[0, "faces_json"])
    assert records and all(r["in_mosaic"] for r in records)
    for r in records:
        assert r["loop_face_style"] in (0.7, 0.4) and r["loop_detail"] == 0.0
        assert r["scores"]["loop_face_style"] == r["loop_face_style"] and r["scores"]["loop_detail"] == 0.0

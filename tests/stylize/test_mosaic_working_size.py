"""The mosaic planned at the engine's working resolution: with an engine that squeezes every input to a fixed
longer side, face tiles still reach ``target_face_px`` where the engine runs, and the ``sheet`` layout hands the
engine the image itself (no shrinking, no change of aspect) plus sheets of tiles of the image's size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stylid_core.config import ConfigError, MosaicConfig
from stylid_core.faces import Face
from stylid_core.stylize import STYLIZERS, Stylizer
from stylid_core.stylize.mosaic import MosaicRestorer


class FixedSideStylizer(Stylizer):
    """Runs every input at a longer side of ``side`` px (as the diffusion engine's ``resolution`` does): resizes
    it there, keeps it (identity), resizes it back. Records each input's size and its faces' size at that scale."""

    name = "fixed-side"

    def __init__(self, side: int) -> None:
        self.side = side
        self.calls: list[dict] = []

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.side / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def stylize(self, content, style, faces=None):
        return self.stylize_batch([content], [style], [faces or []])[0]

    def stylize_batch(self, contents, styles, faces=None):
        faces = faces or [[] for _ in contents]
        self.calls.append({"sizes": [c.shape[:2] for c in contents], "faces": []})
        outs = []
        for content, fs in zip(contents, faces):
            h, w = content.shape[:2]
            wh, ww = self.working_size(h, w)
            self.calls[-1]["faces"].append([f.size_px * ww / w for f in fs])
            small = cv2.resize(content, (ww, wh), interpolation=cv2.INTER_AREA)
            outs.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
        return outs


def _face(box) -> Face:
    x0, y0, x1, y1 = box
    return Face(box=tuple(map(float, box)), keypoints=np.array([[(x0 + x1) / 2, (y0 + y1) / 2]] * 5, np.float32),
                score=1.0)  # fmt: skip


def _photo_like(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=2).astype(np.uint8)


def test_sheet_layout_keeps_the_image_as_is_and_tiles_reach_the_target_at_working_scale():
    engine = FixedSideStylizer(512)
    w, h = 1024, 768  # the engine halves it
    faces = [_face((100, 100, 124, 124)), _face((600, 300, 640, 340)), _face((800, 100, 1000, 300))]
    cfg = MosaicConfig(max_face_px=96, target_face_px=128, layout="sheet")
    restorer = MosaicRestorer(engine, cfg)
    plan = restorer.plan(w, h, faces)
    assert plan.layout == "sheet" and plan.face_indices == {0, 1} and plan.image_scale == 1.0
    assert plan.sheets == 1 and plan.canvas_size == (w, h)
    for tile in plan.tiles:
        assert tile.working_face_px == pytest.approx(128, rel=0.02)
        assert tile.scale == pytest.approx(128 / (faces[tile.face_index].size_px * 0.5))
    out = restorer.stylize(_photo_like(h, w), None, faces)
    assert out.shape == (h, w, 3)
    (call,) = engine.calls  # one batch: the image, then its sheet
    assert call["sizes"] == [(h, w), (h, w)]
    assert call["faces"][0] == pytest.approx([100])  # the image: only the face no tile restores, at the engine scale
    assert sorted(call["faces"][1]) == pytest.approx([128, 128], rel=0.02)  # the sheet's tiles


def test_sheet_layout_keeps_a_panorama_undistorted():
    engine = FixedSideStylizer(512)
    w, h = 4000, 500
    faces = [_face((100 + 300 * k, 200, 130 + 300 * k, 230)) for k in range(10)]
    restorer = MosaicRestorer(engine, MosaicConfig(max_face_px=64, target_face_px=128, layout="sheet"))
    plan = restorer.plan(w, h, faces)
    restorer.stylize(_photo_like(h, w), None, faces)
    sizes = engine.calls[0]["sizes"]
    assert sizes[0] == (h, w) and all(s == (h, w) for s in sizes[1:])
    assert len(sizes) == 1 + plan.sheets
    # a sheet of 4000x500 runs at 512x64: a 128 px face does not fit, so tiles are capped at the sheet's height
    for tile in plan.tiles:
        assert tile.size[1] <= h and tile.working_face_px < 128
        assert tile.working_face_px == pytest.approx(30 * tile.scale * 512 / 4000, rel=0.02)


def test_canvas_layout_plans_tiles_at_the_canvas_scale_and_reports_what_the_image_loses():
    engine = FixedSideStylizer(512)
    w, h = 512, 384  # the engine would run this image at its own size
    faces = [_face((100, 100, 124, 124)), _face((300, 200, 332, 232))]
    restorer = MosaicRestorer(engine, MosaicConfig(max_face_px=64, target_face_px=96, layout="canvas"))
    plan = restorer.plan(w, h, faces)
    cw, ch = plan.canvas_size
    assert cw > w and plan.image_scale == pytest.approx(512 / max(cw, ch), rel=0.01) and plan.image_scale < 1
    restorer.stylize(_photo_like(h, w), None, faces)
    (call,) = engine.calls
    assert call["sizes"] == [(ch, cw)]
    # the tiles' faces reach the target where the engine runs, although the canvas is squeezed
    assert call["faces"][0][2:] == pytest.approx([96, 96], rel=0.03)
    for tile in plan.tiles:
        assert tile.working_face_px == pytest.approx(96, rel=0.03)


def test_engines_at_input_resolution_plan_in_source_pixels():
    for engine in (STYLIZERS.create("identity"), STYLIZERS.create("classical"), STYLIZERS.create("neural")):
        assert engine.working_size(300, 500) == (300, 500)
        faces = [_face((10, 10, 42, 42))]
        for layout in ("canvas", "sheet"):
            plan = MosaicRestorer(engine, MosaicConfig(target_face_px=128, layout=layout)).plan(500, 300, faces)
            assert plan.image_scale == 1.0 and plan.tiles[0].scale == pytest.approx(4.0)


def test_sheet_layout_with_the_identity_engine_restores_exactly_outside_the_crops():
    content = _photo_like(120, 160)
    faces = [_face((20, 30, 44, 54)), _face((100, 60, 130, 90))]
    restorer = MosaicRestorer(STYLIZERS.create("identity"), MosaicConfig(target_face_px=96, layout="sheet"))
    plan = restorer.plan(160, 120, faces)
    out = restorer.stylize(content, content, faces)
    inside = np.zeros((120, 160), bool)
    for tile in plan.tiles:
        x0, y0, x1, y1 = tile.crop
        inside[y0:y1, x0:x1] = True
    assert np.array_equal(out[~inside], content[~inside])
    assert np.abs(out.astype(int) - content)[inside].mean() < 3


def test_sheet_tiles_do_not_overlap_and_overflow_to_more_sheets():
    faces = [_face((20 * k, 10, 20 * k + 16, 26)) for k in range(12)]
    restorer = MosaicRestorer(STYLIZERS.create("identity"), MosaicConfig(target_face_px=64, layout="sheet"))
    plan = restorer.plan(240, 120, faces)
    assert plan.sheets >= 2 and len(plan.tiles) == 12
    for a in plan.tiles:
        x, y = a.position
        assert 0 <= x and x + a.size[0] <= 240 and 0 <= y and y + a.size[1] <= 120
        for b in plan.tiles:
            if a is not b and a.sheet == b.sheet:
                bx, by = b.position
                assert x + a.size[0] <= bx or bx + b.size[0] <= x or y + a.size[1] <= by or by + b.size[1] <= y


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="layout"):
        MosaicConfig(layout="grid")

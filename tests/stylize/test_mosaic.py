"""The mosaic restored content image: exact restore with an identity stylizer, the canvas layout, the feather mask,
and that the mosaic keeps small faces recognisable under the classical engine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stylid_core.config import FacesConfig, MosaicConfig
from stylid_core.faces import Face, create_face_analyzer
from stylid_core.metrics import colour_distance
from stylid_core.sample_data import build_scene, load_photo
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.classical import IdentityStylizer
from stylid_core.stylize.mosaic import MosaicRestorer, face_ellipse_mask, feather_mask


def _face(box, score=1.0) -> Face:
    x0, y0, x1, y1 = box
    kps = np.array([[x0 + 0.3 * (x1 - x0), y0 + 0.4 * (y1 - y0)]] * 5, np.float32)
    return Face(box=tuple(float(v) for v in box), keypoints=kps, score=score)


def _noise(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h, w) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w) + 64], axis=2).astype(np.uint8)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_identity_stylizer_restores_exactly_outside_crops_and_closely_inside():
    content = _smooth(120, 160)
    faces = [_face((20, 30, 44, 54)), _face((100, 60, 130, 90)), _face((60, 0, 160, 100))]  # the last is large
    cfg = MosaicConfig(max_face_px=64, target_face_px=96, layout="canvas")
    restorer = MosaicRestorer(STYLIZERS.create("identity"), cfg)
    plan = restorer.plan(160, 120, faces)
    assert plan.face_indices == {0, 1}
    out = restorer.stylize(content, content, faces)
    assert out.shape == content.shape and out.dtype == np.uint8
    inside = np.zeros(content.shape[:2], bool)
    for tile in plan.tiles:
        x0, y0, x1, y1 = tile.crop
        inside[y0:y1, x0:x1] = True
    assert inside.any() and not inside.all()
    assert np.array_equal(out[~inside], content[~inside])
    diff = np.abs(out.astype(int) - content.astype(int))
    assert diff[inside].mean() < 1.5 and diff[inside].max() <= 12


def test_no_small_faces_means_no_tiles_and_the_image_unchanged():
    content = _noise(50, 70)
    restorer = MosaicRestorer(STYLIZERS.create("identity"), MosaicConfig(max_face_px=20))
    plan = restorer.plan(70, 50, [_face((0, 0, 40, 40))])
    assert plan.tiles == [] and plan.canvas_size == (70, 50)
    assert np.array_equal(restorer.stylize(content, content, [_face((0, 0, 40, 40))]), content)


@pytest.mark.parametrize("n_faces, max_faces", [(3, 32), (40, 32), (12, 5)])
def test_plan_layout(n_faces, max_faces):
    rng = np.random.default_rng(n_faces)
    w, h = 400, 240
    faces = []
    for _ in range(n_faces):
        s = float(rng.uniform(10, 120))
        x0, y0 = float(rng.uniform(0, w - 10)), float(rng.uniform(0, h - 10))
        faces.append(_face((x0, y0, min(w, x0 + s), min(h, y0 + s))))
    cfg = MosaicConfig(max_face_px=64, target_face_px=128, max_faces=max_faces, layout="canvas")
    plan = MosaicRestorer(STYLIZERS.create("identity"), cfg).plan(w, h, faces)
    small = [i for i, f in enumerate(faces) if f.size_px < cfg.max_face_px]
    assert plan.image_size == (w, h)
    assert len(plan.tiles) == min(len(small), max_faces)
    assert plan.face_indices <= set(small)
    # the smallest faces are the ones kept
    if len(small) > max_faces:
        kept = max(faces[i].size_px for i in plan.face_indices)
        dropped = min(faces[i].size_px for i in set(small) - plan.face_indices)
        assert kept <= dropped
    cw, ch = plan.canvas_size
    rects = []
    for tile in plan.tiles:
        px, py = tile.position
        tw, th = tile.size
        rect = (px, py, px + tw, py + th)
        assert 0 <= px and 0 <= py and px + tw <= cw and py + th <= ch, "tile outside the canvas"
        assert not _overlap(rect, (0, 0, w, h)), "tile over the image"
        rects.append(rect)
        x0, y0, x1, y1 = tile.crop
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # upscaled so the face is target_face_px
        assert tile.scale == pytest.approx(cfg.target_face_px / faces[tile.face_index].size_px)
    for a, b in itertools.combinations(rects, 2):
        assert not _overlap(a, b), "tiles overlap"
    content = _noise(h, w)
    canvas, canvas_faces = MosaicRestorer(STYLIZERS.create("identity"), cfg).build_canvas(content, faces, plan)
    assert canvas.shape == (ch, cw, 3)
    assert np.array_equal(canvas[:h, :w], content)
    assert len(canvas_faces) == len(faces) + len(plan.tiles)
    for tile, cf in zip(plan.tiles, canvas_faces[len(faces) :]):
        assert cf.size_px == pytest.approx(cfg.target_face_px, rel=0.1)
        assert tile.position[0] <= cf.box[0] and cf.box[2] <= tile.position[0] + tile.size[0] + 1e-3


def test_feather_mask_is_one_in_the_centre_and_zero_at_the_border():
    m = feather_mask(40, 30, 0.25)
    assert m.shape == (30, 40) and m.dtype == np.float32
    assert m.min() >= 0 and m.max() <= 1
    assert (m[10:20, 12:28] == 1).all()
    border = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
    assert border.max() < 0.15
    # monotone ramp from the left edge to the centre
    assert np.all(np.diff(m[15, :20]) >= 0)


@pytest.fixture(scope="module")
def dlib_analyzer():
    return create_face_analyzer(FacesConfig(backend="dlib"))


def test_mosaic_keeps_small_faces_closer_to_their_identity_with_the_classical_engine(dlib_analyzer):
    analyzer = dlib_analyzer
    style = load_photo("style_ihc")
    people = ("biden", "obama2", "grace_hopper", "astronaut", "obama")
    refs, photo_kps = {}, {}
    for stem in people:
        face = analyzer.analyze(load_photo(stem), max_faces=1)[0]
        refs[stem], photo_kps[stem] = face.embedding, face.keypoints
    scene, placed = build_scene([(stem, 28) for stem in people])
    # ground-truth keypoints: the portrait's keypoints mapped into the scene
    faces = [Face(box=p.box, keypoints=p.to_scene(photo_kps[p.stem]), score=1.0) for p in placed]
    stylizer = STYLIZERS.create("classical")
    plain = stylizer.stylize(scene, style, faces)
    mosaic = MosaicRestorer(stylizer, MosaicConfig(max_face_px=64)).stylize(scene, style, faces)
    kps = [f.keypoints for f in faces]

    def dists(image):
        return np.array([analyzer.distance(e, refs[p.stem]) for e, p in zip(analyzer.embed(image, kps), placed)])

    d_floor, d_plain, d_mosaic = dists(scene), dists(plain), dists(mosaic)
    # stylization costs identity, and the mosaic wins back at least half of what it cost
    assert d_plain.mean() > d_floor.mean() + 0.1
    assert d_mosaic.mean() < d_plain.mean()
    assert (d_plain.mean() - d_mosaic.mean()) >= 0.5 * (d_plain.mean() - d_floor.mean())
    assert (d_mosaic < analyzer.match_threshold).sum() >= (d_plain < analyzer.match_threshold).sum()
    # and the style is kept: the whole image's style distance moves by at most 10 %
    assert abs(colour_distance(mosaic, style) - colour_distance(plain, style)) <= 0.1 * colour_distance(plain, style)


class _StripeStylizer(IdentityStylizer):
    """Paints 2-px stripes in its own pixels: a tile, upscaled before and downscaled after, gets other strokes than
    the full image, the way a real engine paints a tile's background finer."""

    def stylize(self, content, style, faces=None):
        out = content.astype(np.int16)
        out[:, (np.arange(content.shape[1]) // 2) % 2 == 1] += 60
        return np.clip(out, 0, 255).astype(np.uint8)


def test_the_ellipse_restore_leaves_the_plain_stylization_outside_the_face_grown_by_half():
    content = _smooth(160, 200)
    boxes = [(30, 40, 58, 68), (120, 70, 160, 110)]
    faces = [_face(b) for b in boxes]
    stripes = _StripeStylizer()
    plain = stripes.stylize(content, content)
    out = MosaicRestorer(stripes, MosaicConfig(max_face_px=64, target_face_px=128)).stylize(content, content, faces)
    near = np.zeros(content.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        gx, gy = 0.25 * (x1 - x0), 0.25 * (y1 - y0)  # grown by 50% in all: a quarter of the box on each side
        near[int(y0 - gy) : int(np.ceil(y1 + gy)), int(x0 - gx) : int(np.ceil(x1 + gx))] = True
    assert np.array_equal(out[~near], plain[~near])  # no halo: the plain stylization bit for bit
    for x0, y0, x1, y1 in boxes:  # while the face itself is the tile's rendering
        face = (slice(y0 + 8, y1 - 8), slice(x0 + 8, x1 - 8))
        assert np.abs(out[face].astype(int) - plain[face].astype(int)).mean() > 10


def test_the_box_restore_changes_a_square_around_the_face_that_the_ellipse_does_not():
    content = _smooth(160, 200)
    box = (80, 60, 112, 92)
    stripes = _StripeStylizer()
    plain = stripes.stylize(content, content).astype(int)
    changed = {}
    for kind in ("box", "ellipse"):
        cfg = MosaicConfig(max_face_px=64, target_face_px=128, restore_mask=kind)
        out = MosaicRestorer(stripes, cfg).stylize(content, content, [_face(box)]).astype(int)
        changed[kind] = np.abs(out - plain).max(axis=2) > 0
    # the box mask reaches the crop's corners (a straight-edged square); the ellipse stays off the corners
    corner = (slice(60 - 14, 60 - 9), slice(80 - 14, 80 - 9))
    assert changed["box"][corner].any() and not changed["ellipse"][corner].any()


def test_face_ellipse_mask_is_one_at_the_centre_and_zero_at_the_box_corners():
    mask = face_ellipse_mask(100, 80, (20, 10, 80, 70))
    assert mask.shape == (80, 100) and mask.dtype == np.float32
    assert mask[40, 50] == 1.0 and mask[10, 20] < 0.1 and mask[0, 0] == 0.0  # faint at the box's own corner
    assert mask[40, 95] == 0.0 and mask[40, 4] == 0.0  # zero at the box grown by 50%
    assert 0 < mask[40, 50 + 35] < 1  # a smooth ramp, not a step
    row = mask[40]
    assert np.all(np.diff(row[:50]) >= 0) and np.all(np.diff(row[50:]) <= 0)


def test_sheets_are_cut_to_their_tiles_for_an_engine_at_native_size():
    content = _smooth(300, 400)
    faces = [_face((50, 60, 74, 84)), _face((200, 100, 230, 130))]
    restorer = MosaicRestorer(STYLIZERS.create("identity"), MosaicConfig(max_face_px=64, target_face_px=96))
    plan = restorer.plan(400, 300, faces)
    sheets = restorer.build_sheets(content, faces, plan)
    assert len(sheets) == plan.sheets == 1
    sheet, _ = sheets[0]
    used = (max(t.position[0] + t.size[0] for t in plan.tiles), max(t.position[1] + t.size[1] for t in plan.tiles))
    assert sheet.shape[:2] == (used[1], used[0]) and sheet.shape[0] * sheet.shape[1] < 0.7 * 300 * 400
    out = restorer.stylize(content, content, faces)  # and the restore reads the cut sheets right
    assert np.abs(out.astype(int) - content.astype(int)).mean() < 1.0

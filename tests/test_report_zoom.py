"""The report's zoomed strips of the smallest faces: what a strip holds, and which faces the section shows."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pyarrow as pa

from stylid_core.imageio import decode_image
from stylid_core.ledger import write_shard_pair
from stylid_core.report import (
    ZOOM_FACE_PX,
    ZOOM_MAX_FACES,
    ZOOM_SIDE,
    SmallestFaces,
    small_faces_html,
    smallest_face_strips,
    zoom_strip,
)


def test_a_strip_puts_the_faces_neighbourhood_of_each_image_side_by_side():
    h, w = 120, 200
    images = [np.full((h, w, 3), v, np.uint8) for v in (40, 140, 240)]
    for image in images:
        image[50:74, 90:114] = 255 - image[0, 0]  # the 24 px face, drawn in the complement
    strip = decode_image(base64.b64decode(zoom_strip((90.0, 50.0, 114.0, 74.0), images[0], None, *images[1:])))
    assert strip.shape == (ZOOM_SIDE, 3 * ZOOM_SIDE, 3)  # the None panel is skipped
    for k, image in enumerate(images):
        panel = strip[:, k * ZOOM_SIDE : (k + 1) * ZOOM_SIDE].astype(int)
        # the crop is the box grown by half its size per side: the face fills the middle half of the panel
        centre, corner = panel[40:56, 40:56].mean(), panel[:12, :12].mean()
        assert abs(centre - (255 - image[0, 0, 0])) < 12 and abs(corner - image[0, 0, 0]) < 12


def test_the_section_shows_the_smallest_faces_first_and_nothing_without_strips():
    strip = zoom_strip((0.0, 0.0, 10.0, 10.0), np.zeros((20, 20, 3), np.uint8))
    faces = pd.DataFrame({
        "image_id": ["a", "b", "c", "d"], "face_index": [0, 1, 0, 2], "size_px": [40.0, 24.0, 200.0, 31.0],
        "id_dist": [0.4, 0.5, 0.2, 0.45], "id_dist_no_mosaic": [0.7, 0.8, 0.2, 0.75],
        "zoom_strip": [strip, strip, None, strip],
    })  # fmt: skip
    page = small_faces_html(faces, max_faces=2)
    assert "Smallest faces, zoomed" in page
    assert page.count("<img") == 2 and page.index("b face 1, 24 px") < page.index("d face 2, 31 px")
    assert "a face 0" not in page and "id_dist 0.80 / 0.50" in page
    assert small_faces_html(faces.assign(zoom_strip=None)) == ""
    assert small_faces_html(faces.drop(columns="zoom_strip")) == ""


def _key(face: dict) -> tuple:
    return face["size_px"], face["image_id"], face["face_index"]


def test_the_strips_encoded_by_any_number_of_stages_cover_the_outputs_smallest_faces():
    # 6,000 faces scored by 3 stage instances (actors) in arbitrary order, one of them restarted half-way
    rng = np.random.default_rng(0)
    faces = [{"image_id": f"img{k:05d}", "face_index": int(rng.integers(3)), "size_px": float(rng.integers(12, 300))}
             for k in range(6000)]  # fmt: skip
    instances = [SmallestFaces() for _ in range(3)]
    with_strip = []
    for k, face in enumerate(faces):
        if k == 3000:
            instances[0] = SmallestFaces()  # a restarted actor knows nothing of what it admitted before
        if instances[k % 3].admit(face["size_px"], face["image_id"], face["face_index"]):
            with_strip.append(face)
    small = sorted((f for f in faces if f["size_px"] < ZOOM_FACE_PX), key=_key)
    shown = sorted(with_strip, key=_key)[:ZOOM_MAX_FACES]
    assert shown == small[:ZOOM_MAX_FACES]  # what the report shows: the output's smallest faces, each with a strip
    assert all(f["size_px"] < ZOOM_FACE_PX for f in with_strip)
    assert len(with_strip) < 400 < len(small)  # about capacity * ln(n / capacity) per instance, not every small face


def test_the_report_reads_the_smallest_faces_with_strips_across_shards(tmp_path):
    strip = zoom_strip((0.0, 0.0, 10.0, 10.0), np.zeros((20, 20, 3), np.uint8))
    sizes = [[40.0, 200.0, 20.0], [30.0, 31.0, 10.0], [25.0, 33.0, 90.0]]
    for s, shard_sizes in enumerate(sizes):
        ids = [f"s{s}-{k}" for k in range(len(shard_sizes))]
        faces = pa.table({"image_id": ids, "face_index": pa.array([0] * len(ids), pa.int32()),
                          "size_px": shard_sizes, "id_dist": [0.5] * len(ids), "id_dist_no_mosaic": [0.6] * len(ids),
                          "zoom_strip": [None if v >= 48 or v == 10.0 else strip for v in shard_sizes]})  # fmt: skip
        write_shard_pair(str(tmp_path), faces, pa.table({"image_id": ids}), None)
    got = smallest_face_strips(str(tmp_path), None, k=3)
    # 10 px carries no strip (its stage did not admit it): the three smallest with strips, in the report's order
    assert got["size_px"].tolist() == [20.0, 25.0, 30.0] and got["image_id"].tolist() == ["s0-2", "s2-0", "s1-0"]
    assert got["zoom_strip"].notna().all()
    assert smallest_face_strips(str(tmp_path / "empty"), None).empty


def test_the_largest_faces_get_strips_too_and_the_report_reads_them_apart(tmp_path):
    from stylid_core.report import LargestFaces, face_strips

    largest = LargestFaces(capacity=2)
    admitted = [s for s in (50.0, 300.0, 47.0, 120.0, 400.0, 60.0) if largest.admit(s, f"i{s}", 0)]
    assert 47.0 not in admitted and {300.0, 400.0} <= set(admitted)  # small faces are SmallestFaces' business
    strip = zoom_strip((0.0, 0.0, 10.0, 10.0), np.zeros((20, 20, 3), np.uint8))
    sizes = [20.0, 30.0, 64.0, 200.0, 150.0]
    faces = pa.table({"image_id": [f"f{k}" for k in range(5)], "face_index": pa.array([0] * 5, pa.int32()),
                      "size_px": sizes, "id_dist": [0.5] * 5, "id_dist_no_mosaic": [0.6] * 5,
                      "zoom_strip": [strip] * 5})  # fmt: skip
    write_shard_pair(str(tmp_path), faces, pa.table({"image_id": [f"f{k}" for k in range(5)]}), None)
    assert smallest_face_strips(str(tmp_path), None, k=2, largest=True)["size_px"].tolist() == [200.0, 150.0]
    got = face_strips(str(tmp_path), None, k=2)
    assert got["size_px"].tolist() == [20.0, 30.0, 200.0, 150.0]
    from stylid_core.report import small_faces_html

    page = small_faces_html(got) + small_faces_html(got, largest=True)
    assert "Smallest faces" in page and "Largest faces" in page and "200 px" in page and "20 px" in page

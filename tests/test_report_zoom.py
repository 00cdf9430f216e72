"""The report's zoomed strips of the smallest faces: what a strip holds, and which faces the section shows."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd

from stylid_core.imageio import decode_image
from stylid_core.report import ZOOM_SIDE, small_faces_html, zoom_strip


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

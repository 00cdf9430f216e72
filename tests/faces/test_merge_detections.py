"""Duplicate and nested face detections merge into one face before any mask or tile is made."""

import numpy as np

from stylid_core.faces.base import Face, merge_detections


def _face(box, score, tag):
    x0, y0, x1, y1 = box
    keypoints = np.full((5, 2), ((x0 + x1) / 2, (y0 + y1) / 2), dtype=np.float32)
    return Face(box=box, keypoints=keypoints, score=score, embedding=np.full(4, tag, dtype=np.float32))


def test_nested_box_merges_into_the_tight_face():
    # dlib HOG with upsample: a 112 px box over a 45 px face; the loose one even scores higher
    loose = _face((100.0, 80.0, 212.0, 192.0), 1.2, 1)
    tight = _face((130.0, 110.0, 175.0, 155.0), 0.4, 2)
    merged = merge_detections([loose, tight])
    assert [id(f) for f in merged] == [id(tight)]
    assert merged[0].embedding[0] == 2 and np.allclose(merged[0].keypoints, (152.5, 132.5))


def test_duplicate_boxes_keep_the_higher_score():
    low = _face((50.0, 50.0, 110.0, 110.0), 0.3, 1)
    high = _face((56.0, 54.0, 118.0, 116.0), 0.9, 2)
    merged = merge_detections([low, high])
    assert [id(f) for f in merged] == [id(high)]


def test_neighbouring_faces_are_both_kept():
    left = _face((10.0, 10.0, 60.0, 60.0), 0.8, 1)
    right = _face((55.0, 12.0, 105.0, 62.0), 0.7, 2)  # touching shoulders: a small overlap
    far = _face((300.0, 10.0, 340.0, 50.0), 0.5, 3)
    assert [id(f) for f in merge_detections([left, right, far])] == [id(left), id(right), id(far)]


def test_the_loose_box_over_hoppers_face_in_the_bundled_scene_is_merged_away():
    """dlib (upsample 2) finds a 113 px box above Grace Hopper's 46 px face, covering 74% of it: restored through
    the mosaic, its upscaled chandeliers showed as a light patch over her head (issue "Faces that stay painted")."""
    from stylid_core.config import FacesConfig
    from stylid_core.faces import create_face_analyzer
    from stylid_core.sample_data import SCENES, build_scene

    scene, _ = build_scene(SCENES["scene_group_small"])
    faces = create_face_analyzer(FacesConfig(backend="dlib", upsample=2)).detect(scene)
    sizes = sorted(round(f.size_px) for f in faces)
    assert len(faces) == 5 and max(sizes) < 80, sizes  # five people, the largest (Obama) 65 px

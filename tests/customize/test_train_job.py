"""``stylid train-customizer`` on a real local Ray: Ray Data pairs -> TorchTrainer -> checkpoints -> resume."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pandas as pd
import pytest

from stylid_core.imageio import encode_png


def _manifest(tmp_path, astronaut) -> str:
    rows = []
    for i, img in enumerate([astronaut, astronaut[:, ::-1], np.full((80, 80, 3), 90, np.uint8)]):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(encode_png(np.ascontiguousarray(img)))
        rows.append({"image_uri": str(p), "caption": f"a photo of person {i}"})
    rows.append({"image_uri": str(tmp_path / "missing.png"), "caption": None})
    path = str(tmp_path / "manifest.parquet")
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.slow  # a real local Ray: 20-150 s on 2 shared cores
def test_train_then_resume_on_ray(tmp_path, astronaut, ray_local):
    from jobs.cli import main
    from jobs.train_customizer import load_config
    from pipelines.train_customizer import latest_checkpoint
    from stylid_core.customize.facesnap.modules import load_facesnap

    manifest = _manifest(tmp_path, astronaut)
    cfg_path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "train_facesnap_tiny.yaml")
    storage = f"file://{tmp_path}/storage"
    args = ["train-customizer", "--config", cfg_path, "--manifest", manifest, "--storage-path", storage]
    assert main([*args, "--max-steps", "2"]) == 0
    config = load_config(cfg_path, {"manifest": manifest, "storage_path": storage, "max_steps": 2})
    first = latest_checkpoint(config)
    assert first is not None
    fs, root = fsspec.core.url_to_fs(first)
    assert json.loads(fs.cat(f"{root}/train_progress.json"))["step"] == 2

    assert main([*args, "--max-steps", "4"]) == 0  # same storage path and name: resumes at step 2
    second = latest_checkpoint(config)
    fs, root = fsspec.core.url_to_fs(second)
    progress = json.loads(fs.cat(f"{root}/train_progress.json"))
    assert progress == {"step": 4, "resumed_from": 2}

    # the checkpoint loads offline into the inference backend
    from stylid_core.customize.facesnap.components import tiny_components

    modules = load_facesnap(second, tiny_components().unet)
    assert modules.config.face_embed_dim == 128

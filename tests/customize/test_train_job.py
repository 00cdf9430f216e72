"""``stylid train-customizer`` on a real local Ray: Ray Data pairs -> TorchTrainer -> checkpoints -> resume.

One end-to-end run, on S3 (moto): the checkpoints' store is the one part a local path would not check, and a second
whole training job on local paths (~60 s) checked nothing this one does not (the resume step, the weights, the
checkpoint loading into the inference backend)."""

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
        rows.append(
            {"image_uri": str(p), "caption": f"a photo of person {i}", "person_id": "collins" if i < 2 else None}
        )
    rows.append({"image_uri": str(tmp_path / "missing.png"), "caption": None})
    path = str(tmp_path / "manifest.parquet")
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.slow  # a real local Ray and a real S3 endpoint (moto) on 127.0.0.1: 40-150 s on 2 shared cores
def test_checkpoints_on_s3_resume_at_the_right_step_with_the_same_weights(tmp_path, astronaut, ray_local, s3_endpoint):
    import boto3
    import torch

    from jobs.cli import main
    from jobs.config import load_config
    from pipelines.train_customizer import FacePairStage, latest_checkpoint
    from stylid_core.customize.facesnap.modules import read_facesnap
    from stylid_core.customize.facesnap.training import FaceSnapTrainer
    from tests.customize.training_rows import pair_rows

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="stylid-train")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    local = _manifest(tmp_path, astronaut)
    manifest = "s3://stylid-train/inputs/manifest.parquet"
    fs.put_file(local, manifest)
    cfg_path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "train_facesnap_tiny.yaml")
    storage = "s3://stylid-train/checkpoints"
    args = ["train-customizer", "--config", cfg_path, "--manifest", manifest, "--storage-path", storage]
    assert main([*args, "--max-steps", "2"]) == 0
    config = load_config("train", cfg_path, values={"manifest": manifest, "storage_path": storage, "max_steps": 4})
    first = latest_checkpoint(config)
    assert first is not None and first.startswith("s3://stylid-train/checkpoints/")
    assert json.loads(fs.cat(f"{first}/train_progress.json"))["step"] == 2
    assert not os.path.exists("stylid-train") and not os.path.exists(tmp_path / "stylid-train")
    # what a resumed run must continue: step 2's weights and optimiser state, read back from S3
    continued = FaceSnapTrainer(config)
    continued.load(first)
    assert continued.step == 2

    assert main([*args, "--max-steps", "4"]) == 0  # same storage path and name: resumes from S3 at step 2
    second = latest_checkpoint(config)
    assert second.startswith("s3://") and second != first
    assert json.loads(fs.cat(f"{second}/train_progress.json")) == {"step": 4, "resumed_from": 2}

    # the same two steps on the driver (batch size 1: one face pair a step, in manifest order) give the resumed
    # run's weights: it started from step 2's weights and optimiser state, with step 3's and 4's noise
    assert config.batch_size == 1
    rows = pair_rows(config)
    pairs = FacePairStage(config.to_dict(), 32, 128, 68)({c: rows[c].to_numpy() for c in rows.columns})
    assert len(pairs["caption"]) == 2
    for i in range(2):
        continued.train_step({k: v[i : i + 1] for k, v in pairs.items()})
    _, at2 = read_facesnap(first)
    _, at4 = read_facesnap(second)
    assert any(not torch.allclose(at2[k], at4[k], atol=1e-4) for k in at4)  # two steps did move the weights
    for name, value in continued.modules.state_dict().items():
        torch.testing.assert_close(at4[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # the checkpoint loads offline into the inference backend, from S3
    from stylid_core.customize.facesnap.components import tiny_components
    from stylid_core.customize.facesnap.modules import load_facesnap

    modules = load_facesnap(second, tiny_components().unet)
    assert modules.config.face_embed_dim == 128

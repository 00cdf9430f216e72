"""FaceSnap training without Ray: pairs from a real photo, loss goes down, checkpoints resume exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stylid_core.config import ConfigError
from stylid_core.customize.facesnap.training import FacePairExtractor, FaceSnapTrainConfig, FaceSnapTrainer, collate


def _config(tmp_path, **kw) -> FaceSnapTrainConfig:
    base = dict(manifest="unused.parquet", storage_path=str(tmp_path / "ckpt"), tiny={}, batch_size=2,
                learning_rate=1e-3, pose_angle_prob=0.5)  # fmt: skip
    base.update(kw)
    return FaceSnapTrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def batch(astronaut):
    cfg = FaceSnapTrainConfig(manifest="m", storage_path="/tmp/unused", tiny={})
    extractor = FacePairExtractor(cfg, clip_size=32, face_embed_dim=128)
    pairs = [extractor(astronaut, seed=s) for s in range(2)]
    assert all(p is not None for p in pairs)
    assert extractor(np.full((64, 64, 3), 127, np.uint8), seed=0) is None  # no face: no pair
    return collate(pairs)


def test_pairs_have_the_documented_layout(batch):
    assert batch["target"].shape == (2, 32, 32, 3) and batch["target"].dtype == np.uint8
    assert batch["reference_crop"].shape == (2, 32, 32, 3)
    assert batch["target_landmarks"].shape == batch["reference_landmarks"].shape == (2, 68, 2)
    assert batch["embedding"].shape == (2, 128)
    # the reference is augmented (rotated/scaled), the target is the photo itself
    assert not np.allclose(batch["reference_landmarks"][0], batch["target_landmarks"][0], atol=1e-3)
    assert np.all((batch["target_landmarks"] > 0) & (batch["target_landmarks"] < 1))


def test_a_few_steps_lower_the_loss(tmp_path, batch):
    trainer = FaceSnapTrainer(_config(tmp_path))
    before = trainer.evaluate(batch)
    for _ in range(15):
        trainer.train_step(batch)
    after = trainer.evaluate(batch)
    assert after["loss"] < before["loss"], (before, after)
    assert after["landmark_loss"] < before["landmark_loss"]


def test_checkpoint_resume_repeats_an_uninterrupted_run(tmp_path, batch):
    cfg = _config(tmp_path)
    straight = FaceSnapTrainer(cfg)
    for _ in range(4):
        straight.train_step(batch)

    first = FaceSnapTrainer(cfg)
    for _ in range(2):
        first.train_step(batch)
    first.save(str(tmp_path / "step2"))
    resumed = FaceSnapTrainer(cfg)
    resumed.load(str(tmp_path / "step2"))
    assert resumed.step == 2 and resumed.resumed_from == 2
    for name, p in first.modules.state_dict().items():
        assert torch.equal(p, resumed.modules.state_dict()[name])
    for _ in range(2):
        resumed.train_step(batch)
    for name, p in straight.modules.state_dict().items():
        torch.testing.assert_close(resumed.modules.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    assert resumed.evaluate(batch) == pytest.approx(straight.evaluate(batch), rel=1e-5)


def test_train_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="manifest"):
        FaceSnapTrainConfig(storage_path="x", tiny={})
    with pytest.raises(ConfigError, match="image_encoder"):
        FaceSnapTrainConfig(manifest="m", storage_path="x", base_model="/sd")
    with pytest.raises(ConfigError, match="unknown config key"):
        _config(tmp_path, learnig_rate=1)

"""The shipped diffusion job configs validate, and the tiny one builds a working engine."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import yaml

from stylid_core.config import JobConfig
from stylid_core.stylize.base import STYLIZERS
from stylid_core.stylize.diffusion.config import DiffusionConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["stylize_sd15.yaml", "stylize_tiny.yaml"])
def test_config_validates_and_its_options_are_engine_options(name):
    cfg = JobConfig.from_dict(yaml.safe_load((CONFIGS / name).read_text()))
    assert cfg.stylize.engine == "diffusion"
    options = DiffusionConfig.from_options(cfg.stylize.options)
    assert options.steps >= 1


def test_sd15_config_asks_for_one_gpu():
    cfg = JobConfig.from_dict(yaml.safe_load((CONFIGS / "stylize_sd15.yaml").read_text()))
    assert cfg.resources.stylize.num_gpus == 1
    assert cfg.stylize.options["model"] == "runwayml/stable-diffusion-v1-5"


def test_tiny_config_builds_an_engine_that_runs():
    cfg = JobConfig.from_dict(yaml.safe_load((CONFIGS / "stylize_tiny.yaml").read_text()))
    engine = STYLIZERS.create(cfg.stylize.engine, **{**cfg.stylize.options, "steps": 2})
    content = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    assert engine.stylize(content, content).shape == content.shape

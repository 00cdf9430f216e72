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
    assert cfg.stylize.options["model"] == "/models/sd15"  # the cluster's models volume (infra/Dockerfile)


def test_tiny_config_builds_an_engine_that_runs():
    cfg = JobConfig.from_dict(yaml.safe_load((CONFIGS / "stylize_tiny.yaml").read_text()))
    engine = STYLIZERS.create(cfg.stylize.engine, **{**cfg.stylize.options, "steps": 2})
    content = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    assert engine.stylize(content, content).shape == content.shape


def test_sd15_shaped_components_have_sd15s_architecture():
    import torch

    from stylid_core.stylize.diffusion.processors import default_layers, select_layers
    from stylid_core.stylize.diffusion.sd_shaped import build_sd15_shaped_components

    with torch.device("meta"):  # shapes only: no 4 GB of random weights
        parts = build_sd15_shaped_components()
    counts = [sum(p.numel() for p in m.parameters()) for m in (parts.unet, parts.vae, parts.text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD 1.5's unet, vae and text_encoder
    assert default_layers(parts.unet) == ["up_blocks.2", "up_blocks.3"]
    assert len(select_layers(parts.unet, ["up_blocks.2", "up_blocks.3"])) == 6  # StyleID's layers 6-11


def test_sd15_shaped_model_option_builds_the_random_sd15(monkeypatch):
    import stylid_core.stylize.diffusion.engine as engine_module
    from stylid_core.stylize.diffusion.sd_shaped import SD15_SHAPED_MODEL_NAME
    from stylid_core.stylize.diffusion.tiny import build_tiny_components

    built = []

    def build():  # the tiny model stands in: the real one is 4 GB of random weights
        built.append(1)
        return build_tiny_components()

    monkeypatch.setattr(engine_module, "build_sd15_shaped_components", build)
    engine = STYLIZERS.create("diffusion", model="sd15-shaped", resolution=32, steps=1)
    assert built == [1] and engine.model == SD15_SHAPED_MODEL_NAME

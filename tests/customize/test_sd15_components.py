"""The SD 1.5-shaped random components the training benchmark runs on have SD 1.5's sizes (built on the meta
device: no memory, well under a second)."""

from __future__ import annotations

import pytest
import torch

from stylid_core.customize.facesnap.components import random_sd15_components


def _millions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def test_random_sd15_components_have_the_published_sizes():
    with torch.device("meta"):
        comps = random_sd15_components(512, "vit-h-14")
        vit_l = random_sd15_components(512, "vit-l-14").image_encoder
    # parameter counts of runwayml/stable-diffusion-v1-5's unet, vae and text_encoder, and of the CLIP towers
    assert _millions(comps.unet) == 859.52
    assert _millions(comps.vae) == 83.65
    assert _millions(comps.text_encoder) == 123.06
    assert _millions(comps.image_encoder) == 630.77 and _millions(vit_l) == 303.18
    assert comps.unet.config.sample_size == 64 and comps.unet.config.cross_attention_dim == 768
    assert comps.vae.config.scaling_factor == 0.18215 and comps.image_encoder.config.patch_size == 14
    assert all(not p.requires_grad for p in comps.unet.parameters())  # frozen
    with pytest.raises(ValueError, match="image_encoder"):
        random_sd15_components(64, "vit-b")

"""Both ``Customizer`` backends through the registry: tiny FaceSnap, and IP-Adapter-FaceID from files on disk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stylid_core.customize import CUSTOMIZERS
from stylid_core.customize.facesnap.components import tiny_components
from stylid_core.faces.base import Face


@pytest.fixture(scope="module")
def facesnap():
    return CUSTOMIZERS.create("facesnap", config={"tiny": {}, "num_inference_steps": 2, "guidance_scale": 3.0})


def test_facesnap_generates_with_each_pose_kind(facesnap, astronaut, astronaut_face):
    images = facesnap.generate(astronaut, astronaut_face, "a watercolor portrait", num_images=3, seed=1)
    assert len(images) == 3 and all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in images)
    again = facesnap.generate(astronaut, astronaut_face, "a watercolor portrait", num_images=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))  # deterministic per seed
    by_image = facesnap.generate(astronaut, astronaut_face, "x", pose=astronaut[:, ::-1].copy())
    by_angles = facesnap.generate(astronaut, astronaut_face, "x", pose=np.array([0.3, 0.0, 0.1], np.float32))
    assert by_image[0].shape == by_angles[0].shape == (32, 32, 3)
    # the dense landmarks are found from the box when the face analyzer gives only 5 keypoints
    sparse = dataclasses.replace(astronaut_face, landmarks=None)
    assert facesnap.generate(astronaut, sparse, "x")[0].shape == (32, 32, 3)


def test_facesnap_rejects_a_wrong_embedding(facesnap, astronaut, astronaut_face):
    wrong = dataclasses.replace(astronaut_face, embedding=np.ones(512, np.float32))
    with pytest.raises(ValueError, match="128-d embedding"):
        facesnap.generate(astronaut, wrong, "x")


def test_facesnap_from_a_saved_checkpoint(tmp_path, astronaut, astronaut_face):
    from stylid_core.customize.facesnap.engine import tiny_model_config
    from stylid_core.customize.facesnap.modules import FaceSnapModules, save_facesnap

    comps = tiny_components()
    torch.manual_seed(5)
    save_facesnap(FaceSnapModules(tiny_model_config(comps), comps.unet), str(tmp_path / "ck"))
    c = CUSTOMIZERS.create("facesnap", config={"tiny": {}, "checkpoint": str(tmp_path / "ck"),
                                               "num_inference_steps": 2})  # fmt: skip
    assert c.model == str(tmp_path / "ck")
    assert c.generate(astronaut, astronaut_face, "x")[0].shape == (32, 32, 3)


def _write_tiny_sd(path):
    from diffusers import StableDiffusionPipeline

    comps = tiny_components()
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=comps.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(path))
    return comps.unet


def _write_faceid_adapter(path, unet, cross=32, tokens=4):
    """A random IP-Adapter-FaceID file with the original layout (image_proj MLP + per-layer to_k_ip/to_v_ip)."""
    g = torch.Generator().manual_seed(0)
    state = {
        "image_proj.proj.0.weight": torch.randn(1024, 512, generator=g) * 0.02,
        "image_proj.proj.0.bias": torch.zeros(1024),
        "image_proj.proj.2.weight": torch.randn(cross * tokens, 1024, generator=g) * 0.02,
        "image_proj.proj.2.bias": torch.zeros(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    modules = dict(unet.named_modules())
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = modules[name[: -len(".processor")]].to_k.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            key_id += 2
    path.mkdir()
    save_file(state, str(path / "ip-adapter-faceid_sd15.safetensors"))


def test_ip_adapter_faceid_loads_an_adapter_file_and_generates(tmp_path, astronaut, astronaut_face):
    unet = _write_tiny_sd(tmp_path / "sd")
    _write_faceid_adapter(tmp_path / "adapter", unet)
    config = {
        "base_model": str(tmp_path / "sd"),
        "adapter_path": str(tmp_path / "adapter"),
        "weight_name": "ip-adapter-faceid_sd15.safetensors",
        "resolution": 32,
        "num_inference_steps": 2,
    }
    c = CUSTOMIZERS.create("ip_adapter_faceid", config=config)
    procs = c.pipe.unet.attn_processors
    assert sum("IPAdapter" in type(p).__name__ for p in procs.values()) == (len(procs) // 2)
    face = dataclasses.replace(astronaut_face, embedding=np.random.default_rng(0).normal(size=512).astype(np.float32))
    images = c.generate(astronaut, face, "a portrait", num_images=2, seed=3)
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    other = dataclasses.replace(face, embedding=-face.embedding)
    assert not np.array_equal(images[0], c.generate(astronaut, other, "a portrait", num_images=1, seed=3)[0])
    with pytest.raises(ValueError, match="512-d ArcFace"):
        c.generate(astronaut, astronaut_face, "x")  # a 128-d dlib embedding
    with pytest.raises(FileNotFoundError):
        CUSTOMIZERS.create("ip_adapter_faceid", config={**config, "weight_name": "nope.bin"})


def test_unknown_customizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown customizer"):
        CUSTOMIZERS.create("nope")
    assert Face  # the interface type used by both backends

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
    # the landmark branch on both steps (the default 0.4 of 2 steps is none)
    config = {"tiny": {}, "num_inference_steps": 2, "guidance_scale": 3.0, "landmark_steps_end": 1.0}
    c = CUSTOMIZERS.create("facesnap", config=config)
    modules = c.engine.modules
    # untrained, the landmark predictor's correction and the ControlNet's zero convolutions are exactly zero, so
    # neither the pose nor the landmark map could change anything; give them small random weights
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in [*modules.predictor.decoder[-1].parameters(), *modules.identity.controlnet.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return c


def _centre_and_scale(points: np.ndarray) -> tuple[np.ndarray, float]:
    centre = points.mean(0)
    return centre, float(np.sqrt(((points - centre) ** 2).sum(1).mean()))


def test_facesnap_generates_with_each_pose_kind(facesnap, astronaut, astronaut_face):
    from stylid_core.customize.facesnap.faceprep import relative_landmarks

    engine = facesnap.engine
    images = facesnap.generate(astronaut, astronaut_face, "a watercolor portrait", num_images=3, seed=1)
    assert len(images) == 3 and all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in images)
    again = facesnap.generate(astronaut, astronaut_face, "a watercolor portrait", num_images=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))  # deterministic per seed

    h, w = astronaut.shape[:2]
    ref = relative_landmarks(astronaut_face.landmarks, h, w)
    mirrored = astronaut[:, ::-1].copy()
    targets = {
        "none": engine.target_landmarks(astronaut, astronaut_face, None)[0].numpy(),
        "own landmarks": engine.target_landmarks(astronaut, astronaut_face, ref)[0].numpy(),
        "image": engine.target_landmarks(astronaut, astronaut_face, mirrored)[0].numpy(),
        "angles": engine.target_landmarks(astronaut, astronaut_face, np.array([0.6, 0.0, 0.4], np.float32))[0].numpy(),
    }
    # no pose = the reference as its own driving face
    np.testing.assert_allclose(targets["none"], targets["own landmarks"], atol=1e-6)
    c_ref, s_ref = _centre_and_scale(ref)
    # a driving image places the face where the driving face is: the mirrored photo's face is mirrored in x
    c_img, s_img = _centre_and_scale(targets["image"])
    assert abs(c_img[0] - (1 - c_ref[0])) < 0.02 and abs(c_img[1] - c_ref[1]) < 0.02 and abs(s_img / s_ref - 1) < 0.1
    # angles keep the reference's place and size (up to the predicted correction) but change the shape
    c_ang, s_ang = _centre_and_scale(targets["angles"])
    assert np.abs(c_ang - c_ref).max() < 0.01 and abs(s_ang / s_ref - 1) < 0.1
    assert np.abs(targets["angles"] - targets["none"]).max() > 1e-3

    # the target landmarks reach the image through the landmark branch
    def one(pose):
        return facesnap.generate(astronaut, astronaut_face, "x", pose=pose, seed=2)[0].astype(int)

    plain = one(None)
    assert np.array_equal(plain, one(ref))
    for pose in (mirrored, np.array([0.6, 0.0, 0.4], np.float32)):
        assert np.abs(one(pose) - plain).max() > 0
    # the dense landmarks are found from the box when the face analyzer gives only 5 keypoints
    sparse = dataclasses.replace(astronaut_face, landmarks=None)
    assert np.abs(facesnap.generate(astronaut, sparse, "x", seed=2)[0].astype(int) - plain).mean() < 2.0


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


def _write_faceid_adapter(path, unet, cross=32, tokens=4, lora_rank=0):
    """A random IP-Adapter-FaceID file with the original layout (image_proj MLP + per-layer to_k_ip/to_v_ip; with
    ``lora_rank``, also the LoRA of every attention layer that the real ``.bin`` carries: to_q/k/v/out_lora)."""
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
    for key_id, name in enumerate(unet.attn_processors) if lora_rank else ():
        attn = modules[name[: -len(".processor")]]
        for kind, layer in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
            state[f"ip_adapter.{key_id}.to_{kind}_lora.down.weight"] = torch.randn(lora_rank, layer.in_features,
                                                                                   generator=g) * 0.3  # fmt: skip
            state[f"ip_adapter.{key_id}.to_{kind}_lora.up.weight"] = torch.randn(layer.out_features, lora_rank,
                                                                                 generator=g) * 0.3  # fmt: skip
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


def _write_lora(path, unet, layout="kohya", rank=4):
    """A random UNet LoRA on to_q, to_k, to_v and to_out.0 of every attention layer. ``kohya``: the layout of the
    published ``ip-adapter-faceid_sd15_lora.safetensors`` (``lora_unet_<module path with _>.lora_down.weight`` /
    ``.lora_up.weight``); ``peft``: diffusers' own (``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``)."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                layer = module.get_submodule(proj)
                down = torch.randn(rank, layer.in_features, generator=g) * 0.3
                up = torch.randn(layer.out_features, rank, generator=g) * 0.3
                if layout == "kohya":
                    key = "lora_unet_" + f"{name}.{proj}".replace(".", "_")
                    state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
                else:
                    state[f"unet.{name}.{proj}.lora_A.weight"], state[f"unet.{name}.{proj}.lora_B.weight"] = down, up
    save_file(state, str(path))
    return len(state) // 2


def _unet_output(customizer) -> torch.Tensor:
    """The customizer's UNet (with its IP-Adapter and LoRA) on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    unet = customizer.pipe.unet
    latents = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    face = torch.randn(1, 1, 512, generator=g)
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [face]}).sample


@pytest.fixture(scope="module")
def faceid_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faceid")
    unet = _write_tiny_sd(d / "sd")
    _write_faceid_adapter(d / "adapter", unet)
    _write_faceid_adapter(d / "adapter-with-lora", unet, lora_rank=4)
    n_layers = _write_lora(d / "ip-adapter-faceid_sd15_lora.safetensors", unet, "kohya")
    assert _write_lora(d / "peft_lora.safetensors", unet, "peft") == n_layers
    return d, n_layers


@pytest.mark.parametrize("lora_file", ["ip-adapter-faceid_sd15_lora.safetensors", "peft_lora.safetensors"])
def test_ip_adapter_faceid_lora_file_changes_the_unet_and_scales(faceid_files, lora_file, astronaut, astronaut_face):
    d, n_layers = faceid_files
    base = {"base_model": str(d / "sd"), "adapter_path": str(d / "adapter"), "resolution": 32,
            "weight_name": "ip-adapter-faceid_sd15.safetensors", "num_inference_steps": 2}  # fmt: skip
    lora = str(d / lora_file)
    plain = CUSTOMIZERS.create("ip_adapter_faceid", config=base)
    full = CUSTOMIZERS.create("ip_adapter_faceid", config={**base, "lora_path": lora})
    off = CUSTOMIZERS.create("ip_adapter_faceid", config={**base, "lora_path": lora, "lora_scale": 0.0})
    assert plain.lora is None and full.lora == off.lora == "faceid_lora" and lora in full.model
    # every to_q/to_k/to_v/to_out.0 named in the file got its LoRA; the IP-Adapter processors are still there
    wrapped = [n for n, m in full.pipe.unet.named_modules() if hasattr(m, "lora_A") and "faceid_lora" in m.lora_A]
    assert len(wrapped) == n_layers
    assert sum("IPAdapter" in type(p).__name__ for p in full.pipe.unet.attn_processors.values()) > 0
    ref = _unet_output(plain)
    assert (_unet_output(full) - ref).abs().max() > 1e-3
    torch.testing.assert_close(_unet_output(off), ref, rtol=0, atol=0)
    face = dataclasses.replace(astronaut_face, embedding=np.random.default_rng(0).normal(size=512).astype(np.float32))
    image = plain.generate(astronaut, face, "a portrait", seed=3)[0]
    assert not np.array_equal(full.generate(astronaut, face, "a portrait", seed=3)[0], image)
    assert np.array_equal(off.generate(astronaut, face, "a portrait", seed=3)[0], image)


def test_ip_adapter_faceid_lora_inside_the_adapter_file(faceid_files):
    """diffusers applies the LoRA the real .bin carries (as faceid_0): lora_scale weights it, lora_path would
    apply a second one and is refused."""
    d, _ = faceid_files
    base = {"base_model": str(d / "sd"), "adapter_path": str(d / "adapter-with-lora"),
            "weight_name": "ip-adapter-faceid_sd15.safetensors", "resolution": 32}  # fmt: skip
    plain = CUSTOMIZERS.create("ip_adapter_faceid", config={**base, "adapter_path": str(d / "adapter")})
    inside = CUSTOMIZERS.create("ip_adapter_faceid", config=base)
    off = CUSTOMIZERS.create("ip_adapter_faceid", config={**base, "lora_scale": 0.0})
    assert inside.lora == off.lora == "faceid_0"
    ref = _unet_output(plain)
    assert (_unet_output(inside) - ref).abs().max() > 1e-3
    torch.testing.assert_close(_unet_output(off), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already carries the FaceID LoRA"):
        CUSTOMIZERS.create(
            "ip_adapter_faceid", config={**base, "lora_path": str(d / "ip-adapter-faceid_sd15_lora.safetensors")}
        )
    with pytest.raises(FileNotFoundError, match="lora_path"):
        CUSTOMIZERS.create("ip_adapter_faceid", config={**base, "lora_path": str(d / "nope.safetensors")})


def test_unknown_customizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown customizer"):
        CUSTOMIZERS.create("nope")
    assert Face  # the interface type used by both backends

"""Shapes of the FaceSnap modules, where gradients go, save/load, and equality with plain SD at scale 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from stylid_core.config import ConfigError
from stylid_core.customize.facesnap.components import tiny_components
from stylid_core.customize.facesnap.config import FaceSnapConfig, FaceSnapModelConfig
from stylid_core.customize.facesnap.engine import FaceSnapEngine, tiny_model_config
from stylid_core.customize.facesnap.identity_module import IdentityAttnProcessor
from stylid_core.customize.facesnap.landmarks import LandmarkPredictor, render_landmark_map
from stylid_core.customize.facesnap.mixer import FacialAttributeMixer
from stylid_core.customize.facesnap.modules import FaceSnapModules, load_facesnap, save_facesnap


@pytest.fixture()
def tiny():
    comps = tiny_components()
    torch.manual_seed(0)
    modules = FaceSnapModules(tiny_model_config(comps), comps.unet)
    return comps, modules


def test_mixer_shapes_and_embedding_check():
    cfg = FaceSnapModelConfig(clip_dim=24, face_embed_dim=128, cross_attention_dim=32, num_tokens=6,
                              mixer_dim=16, mixer_depth=2, mixer_heads=2)  # fmt: skip
    mixer = FacialAttributeMixer(cfg)
    out = mixer(torch.randn(3, 17, 24), torch.randn(3, 128))
    assert out.shape == (3, 6, 32)
    with pytest.raises(ValueError, match="128"):
        mixer(torch.randn(3, 17, 24), torch.randn(3, 512))
    # the embedding matters: different identities give different tokens for the same crop
    patches = torch.randn(1, 17, 24)
    assert not torch.allclose(mixer(patches, torch.randn(1, 128)), mixer(patches, torch.randn(1, 128)))


def test_predictor_shapes_and_untrained_identity():
    pred = LandmarkPredictor(FaceSnapModelConfig(predictor_hidden=32, predictor_depth=2))
    ref = torch.rand(2, 68, 2) * 0.3 + 0.3
    drv = torch.rand(2, 68, 2) * 0.2 + 0.5
    out, norm = pred(ref, driving_landmarks=drv)
    assert out.shape == norm.shape == (2, 68, 2)
    # untrained (zero-initialised correction): the reference's shape, moved to the driving face's place and size
    assert torch.allclose(out.mean(1), drv.mean(1), atol=1e-5)
    out_angles, _ = pred(ref, pose_angles=torch.zeros(2, 3))
    assert torch.allclose(out_angles, ref, atol=1e-5)
    with pytest.raises(ValueError, match="driving_landmarks or pose_angles"):
        pred(ref)


def test_landmark_map_channels_and_peaks():
    lm = torch.tensor([[[0.25, 0.25], [0.75, 0.5]]])
    m = render_landmark_map(lm, 16, 16, channels=2, sigma=1.0)
    assert m.shape == (1, 2, 16, 16)
    assert m[0, 0].argmax() == 4 * 16 + 4 or m[0, 0, 3:5, 3:5].max() > 0.7
    assert m[0, 1, 7:9, 11:13].max() > 0.7 and m.max() <= 1.0
    assert render_landmark_map(torch.rand(2, 68, 2), 8, 8, channels=5).shape == (2, 5, 8, 8)


def test_identity_module_installs_processors_on_cross_attention_only(tiny):
    comps, modules = tiny
    modules.identity.install(comps.unet)
    procs = comps.unet.attn_processors
    cross = [n for n in procs if n.endswith("attn2.processor")]
    assert cross and all(isinstance(procs[n], IdentityAttnProcessor) for n in cross)
    assert not any(isinstance(p, IdentityAttnProcessor) for n, p in procs.items() if n.endswith("attn1.processor"))


def test_gradients_reach_only_trainable_modules(tiny):
    comps, modules = tiny
    modules.identity.install(comps.unet)
    lat = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, 32)
    patches = torch.randn(2, 17, comps.image_encoder.config.hidden_size)
    tokens = modules.mixer(patches, torch.randn(2, 128))
    pred_lm, _ = modules.predictor(torch.rand(2, 68, 2), driving_landmarks=torch.rand(2, 68, 2))
    lmap = render_landmark_map(pred_lm, 16, 16, 5)
    out = modules.identity.predict_noise(comps.unet, lat, torch.tensor([10, 500]), text, tokens, lmap)
    assert out.shape == lat.shape
    (out.pow(2).mean() + pred_lm.pow(2).mean()).backward()
    frozen = [(n, p) for n, p in comps.unet.named_parameters() if ".processor." not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for _, p in frozen)
    for m in (comps.vae, comps.text_encoder, comps.image_encoder):
        assert all(p.grad is None for p in m.parameters())
    for part in (modules.mixer, modules.identity.processors, modules.predictor.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # the ControlNet's zero convolutions receive gradients, so the landmark branch can start learning
    assert float(modules.identity.controlnet.controlnet_mid_block.weight.grad.abs().sum()) > 0


def test_scale_zero_without_landmarks_equals_plain_sd_pipeline(tiny):
    comps, modules = tiny
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=comps.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(7)
    plain = pipe("a portrait", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 num_images_per_prompt=2, generator=gen, output_type="np").images  # fmt: skip
    engine = FaceSnapEngine(comps, modules)  # installs the identity processors
    cond = engine.encode_prompt(["a portrait"]).expand(2, -1, -1)
    uncond = engine.encode_prompt([""])
    tokens = torch.randn(1, 4, 32)
    ours = engine.sample(cond, uncond, tokens, None, 32, 3, 5.0, torch.Generator().manual_seed(7),
                         identity_scale=0.0, landmark_scale=0.0)  # fmt: skip
    np.testing.assert_allclose(ours, plain, atol=1e-6)
    # one image per UNet batch gives the same images (up to float summation order)
    one_by_one = engine.sample(cond, uncond, tokens, None, 32, 3, 5.0, torch.Generator().manual_seed(7),
                               identity_scale=0.0, landmark_scale=0.0, max_batch=1)  # fmt: skip
    np.testing.assert_allclose(one_by_one, plain, atol=1e-5)
    with_id = engine.sample(cond, uncond, tokens, None, 32, 3, 5.0, torch.Generator().manual_seed(7),
                            identity_scale=1.0, landmark_scale=0.0)  # fmt: skip
    assert np.abs(with_id - plain).max() > 1e-3


def test_landmark_branch_without_identity_gets_zeroed_identity_tokens_as_in_training(tiny):
    comps, modules = tiny
    with torch.no_grad():  # the zero convolutions would hide what the ControlNet was given
        for p in modules.identity.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine = FaceSnapEngine(comps, modules)
    seen = []
    forward = modules.identity.controlnet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())
        return forward(*args, **kwargs)

    modules.identity.controlnet.forward = spy
    cond = engine.encode_prompt(["a portrait"]).expand(2, -1, -1)
    landmarks = torch.rand(1, modules.config.num_landmarks, 2) * 0.5 + 0.25
    engine.sample(cond, engine.encode_prompt([""]), None, landmarks, 32, 2, 5.0, torch.Generator().manual_seed(3),
                  identity_scale=0.0, landmark_scale=1.0)  # fmt: skip
    cfg = modules.config
    assert len(seen) == 2 and all(c.shape == (4, cfg.num_tokens, cfg.cross_attention_dim) for c in seen)
    assert all(float(c.abs().max()) == 0.0 for c in seen)  # zeroed tokens, not the prompt's text embeddings
    # the same noise prediction as training's identity-dropout input: zeroed tokens, identity attention off
    lat, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), cond
    lmap = render_landmark_map(landmarks.expand(2, -1, -1), 16, 16, cfg.landmark_channels)
    with torch.no_grad():
        no_tokens = modules.identity.predict_noise(comps.unet, lat, t, text, None, lmap, 0.0, 1.0)
        zeroed = modules.identity.predict_noise(
            comps.unet, lat, t, text, torch.zeros(2, cfg.num_tokens, cfg.cross_attention_dim), lmap, 0.0, 1.0
        )
        with_text = modules.identity.predict_noise(comps.unet, lat, t, text, text, lmap, 0.0, 1.0)
    torch.testing.assert_close(no_tokens, zeroed)
    assert float((no_tokens - with_text).abs().max()) > 1e-4  # what was given before the fix differs


def test_save_load_roundtrip_reproduces_outputs(tiny, tmp_path):
    comps, modules = tiny
    with torch.no_grad():  # make the zero-initialised parts non-trivial
        for p in modules.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_facesnap(modules, str(tmp_path / "ckpt"))
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"facesnap.safetensors", "facesnap_config.json"}
    comps2 = tiny_components()
    loaded = load_facesnap(str(tmp_path / "ckpt"), comps2.unet)
    assert loaded.config == modules.config
    for (n1, p1), (n2, p2) in zip(modules.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    lm = torch.rand(1, 68, 2) * 0.4 + 0.3
    outs = []
    for c, m in ((comps, modules), (comps2, loaded)):
        engine = FaceSnapEngine(c, m)
        cond = engine.encode_prompt(["a portrait"])
        tokens = m.mixer(torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(1)), torch.ones(1, 128))
        target = m.predictor(lm, driving_landmarks=lm)[0]
        outs.append(engine.sample(cond, engine.encode_prompt([""]), tokens, target, 32, 2, 3.0,
                                  torch.Generator().manual_seed(3)))  # fmt: skip
    np.testing.assert_array_equal(outs[0], outs[1])


def test_config_validation():
    with pytest.raises(ConfigError, match="base_model"):
        FaceSnapConfig()
    with pytest.raises(ConfigError, match="unknown config key"):
        FaceSnapConfig.from_dict({"tiny": {}, "identity_scael": 1.0})
    with pytest.raises(ConfigError, match="mixer_heads"):
        FaceSnapModelConfig(mixer_dim=30, mixer_heads=4)
    with pytest.raises(ConfigError, match="num_landmarks"):
        FaceSnapModelConfig(num_landmarks=17)

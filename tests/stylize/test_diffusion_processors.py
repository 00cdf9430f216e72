"""StyleInjectionProcessor: stock-identical when off, real style keys/values when on, style features cached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter

import numpy as np
import pytest
import torch

from stylid_core.stylize.base import STYLIZERS
from stylid_core.stylize.diffusion.processors import InjectionState, default_layers, install_processors, select_layers
from stylid_core.stylize.diffusion.tiny import build_tiny_components

NO_GUIDANCE = dict(guidance=False, reweight=False, anchor=False)


def _image(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _unet_out(unet, x, t=500):
    cond = torch.zeros(x.shape[0], 77, 32)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


@pytest.mark.parametrize("mode", ["off", "record"])
def test_processors_off_or_recording_are_bit_identical_to_stock(mode):
    stock = build_tiny_components(seed=3, conv_out_scale=1.0).unet
    ours = build_tiny_components(seed=3, conv_out_scale=1.0).unet
    state = InjectionState(mode=mode, timestep=500)
    state.reset_recording(("q", "k", "v"))
    layers = select_layers(ours, default_layers(ours))
    install_processors(ours, layers, state)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_unet_out(stock, x), _unet_out(ours, x))
    state.collect()  # what the engine does after each UNet call: file the recordings under the timestep
    if mode == "record":
        assert len(state.recorded["k"]) == len(layers)


def test_default_layers_are_the_last_two_attention_up_blocks():
    unet = build_tiny_components().unet
    assert default_layers(unet) == ["up_blocks.0", "up_blocks.1"]
    chosen = select_layers(unet, ["up_blocks.1"])
    assert chosen and all(n.startswith("up_blocks.1.") and ".attn1." in n for n in chosen)


def test_style_equal_content_with_gamma_1_tau_1_equals_plain_reconstruction():
    common = dict(tiny=True, resolution=32, steps=8, adain=True, **NO_GUIDANCE)
    styleid = STYLIZERS.create("diffusion", gamma=1.0, temperature=1.0, **common)
    plain = STYLIZERS.create(
        "diffusion", inject_kv=False, query_preservation=False, temperature=1.0, **{**common, "adain": False}
    )
    image = _image(0)
    latents = styleid.encode(styleid._to_tensor([image], (32, 32)))
    out = styleid.stylize_latents(latents, styleid.style_features(image))
    ref = plain.stylize_latents(latents, plain.style_features(image))
    assert float((out - ref).norm() / ref.norm()) < 5e-3
    # and a different style with the StyleID defaults really changes the result
    default = STYLIZERS.create("diffusion", tiny=True, resolution=32, steps=8, **NO_GUIDANCE)
    styled = default.stylize_latents(latents, default.style_features(_image(9)))
    assert float((styled - ref).norm() / ref.norm()) > 5 * float((out - ref).norm() / ref.norm())


def test_injected_keys_values_come_from_the_style_pass():
    engine = STYLIZERS.create("diffusion", tiny=True, resolution=32, steps=6, **NO_GUIDANCE)
    style = engine.style_features(_image(1, 32, 32))  # 16x16 latent: style token counts differ from the content's
    seen: Counter = Counter()
    checks = []

    def on_inject(layer, t, q, k, v):
        seen[(layer, t)] += 1
        checks.append(
            torch.equal(k[0], style.k[layer][t][0])
            and torch.equal(v[-1], style.v[layer][t][0])
            and k.shape[0] == q.shape[0] == 2
            and k.shape[1] == style.k[layer][t].shape[1] != q.shape[1]
        )

    engine.state.on_inject = on_inject
    content = [_image(2, 16, 32), _image(3, 16, 32)]  # working size 16x32 -> 8x16 latent
    engine.stylize_batch(content, [style_img := _image(1, 32, 32), style_img])
    layers = [n.removesuffix(".processor") for n in engine.layers]
    assert set(seen) == {(layer, t) for layer in layers for t in engine.schedule.timesteps}
    assert set(seen.values()) == {1}
    assert all(checks) and len(checks) == len(layers) * 6
    assert set(style.k) == set(layers) and all(len(per_t) == 6 for per_t in style.k.values())
    assert all(t.device == engine.device for per_t in style.k.values() for t in per_t.values())


def test_style_cached_once_serves_many_contents_like_recomputing():
    engine = STYLIZERS.create("diffusion", tiny=True, resolution=32, steps=6, batch_size=4, **NO_GUIDANCE)
    style = _image(7)
    contents = [_image(10 + i) for i in range(3)]
    batched = engine.stylize_batch(contents, [style] * 3)
    assert engine.style_cache.misses == 1 and len(engine.style_cache) == 1
    assert engine.stylize_batch(contents[:1], [style.copy()])[0] is not None
    assert engine.style_cache.hits >= 1 and engine.style_cache.misses == 1
    for content, out in zip(contents, batched):
        engine.style_cache.clear()
        alone = engine.stylize(content, style)
        assert out.shape == content.shape and out.dtype == np.uint8
        assert np.abs(alone.astype(int) - out.astype(int)).max() <= 1


def test_style_cache_is_bounded_lru():
    engine = STYLIZERS.create("diffusion", tiny=True, resolution=32, steps=2, style_cache_size=2, **NO_GUIDANCE)
    keys = [engine.style_features(_image(s)).key for s in (1, 2, 3)]
    assert len(engine.style_cache) == 2
    assert engine.style_cache.get(keys[0]) is None and engine.style_cache.get(keys[2]) is not None


def test_temperature_and_gamma_change_the_output():
    base = dict(tiny=True, resolution=32, steps=4, **NO_GUIDANCE)
    content, style = _image(4), _image(5)
    ref = STYLIZERS.create("diffusion", **base)
    latents = ref.encode(ref._to_tensor([content], (32, 32)))
    outs = [ref.stylize_latents(latents, ref.style_features(style))]
    for extra in (dict(temperature=1.0), dict(gamma=0.0)):
        engine = STYLIZERS.create("diffusion", **base, **extra)
        outs.append(engine.stylize_latents(latents, engine.style_features(style)))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])

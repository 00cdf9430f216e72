"""Content consistency guidance: the face mask, and each of its three parts pulling faces back to the content."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from stylid_core.faces.base import Face
from stylid_core.stylize.base import STYLIZERS

NONE = dict(guidance=False, reweight=False, anchor=False)
BASE = dict(tiny=True, resolution=32, steps=8)


def _image(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _face(box) -> Face:
    return Face(box=box, keypoints=np.zeros((5, 2), np.float32), score=1.0)


def test_face_mask_maps_content_pixels_to_latent_cells():
    engine = STYLIZERS.create("diffusion", **BASE, **NONE, face_mask_margin=0.0, face_mask_blur=0)
    # content 64x128 px (h x w) -> latent 8x16 (working size 16x32, VAE factor 2); the box covers the right half
    # of the top half of the image
    mask = engine.face_mask([[_face((64, 0, 128, 32))], []], [(64, 128), (64, 128)], (8, 16))
    assert mask.shape == (2, 1, 8, 16)
    expected = torch.zeros(8, 16)
    expected[:4, 8:] = 1
    assert torch.equal(mask[0, 0], expected)
    assert mask[1].sum() == 0
    assert engine.face_mask([[], []], [(64, 128)] * 2, (8, 16)) is None


def _masked_loss(options: dict) -> float:
    # No AdaIN: the tiny model reconstructs (its conv_out is scaled to 1e-3), so without guidance the masked
    # loss is what the style injection moved the face away from the content.
    engine = STYLIZERS.create("diffusion", **BASE, adain=False, **options)
    content, style = _image(1), (_image(2) // 4 + 10).astype(np.uint8)
    latents = engine.encode(engine._to_tensor([content], (32, 32)))
    mask = engine.face_mask([[_face((8, 8, 24, 24))]], [(32, 32)], latents.shape[-2:])
    out = engine.stylize_latents(latents, engine.style_features(style), mask)
    return float((mask * (out - latents) ** 2).sum() / mask.sum())


@pytest.fixture(scope="module")
def unguided_loss() -> float:
    return _masked_loss(NONE)


@pytest.mark.parametrize(
    "part",
    [
        dict(guidance=True, guidance_grad="x0", guidance_weight=0.5, guidance_steps=[0.0, 1.0]),
        dict(guidance=True, guidance_grad="unet", guidance_weight=0.5, guidance_steps=[0.0, 0.5]),
        dict(reweight=True, face_gamma=0.75, content_kv_weight=4.0),
        dict(anchor=True, anchor_weight=0.5, anchor_steps=[0.0, 0.5]),
    ],
    ids=["guidance-x0", "guidance-unet", "reweight-content-kv", "anchor"],
)
def test_each_consistency_part_lowers_the_masked_latent_loss(part, unguided_loss):
    options = {**NONE, **part}
    assert _masked_loss(options) < 0.9 * unguided_loss


def test_face_gamma_puts_the_content_query_inside_the_mask():
    engine = STYLIZERS.create("diffusion", **BASE, **{**NONE, "reweight": True}, face_gamma=1.0, gamma=0.0)
    latents = engine.encode(engine._to_tensor([_image(5)], (32, 32)))
    mask = engine.face_mask([[_face((0, 0, 16, 32))]], [(32, 32)], latents.shape[-2:])  # left half
    content = engine.content_pass(latents)
    seen = []

    def on_inject(layer, t, q, k, v):
        token_mask = engine.state.token_mask(q.shape[1])[0, :, 0]
        q_content = content.q[layer][t][0]
        inside, outside = token_mask == 1, token_mask == 0
        same_inside = torch.equal(q[0][inside], q_content[inside])
        seen.append(same_inside and not torch.equal(q[0][outside], q_content[outside]))

    engine.state.on_inject = on_inject
    z_T = content.trajectory[engine.schedule.timesteps[0]]
    engine.sample(z_T, engine.style_features(_image(6)), content, mask)
    assert seen and all(seen)


def test_all_parts_together_lower_the_loss_most(unguided_loss):
    together = _masked_loss(dict(guidance=True, reweight=True, anchor=True))
    assert together < 0.5 * unguided_loss


def test_guidance_without_faces_changes_nothing():
    engine = STYLIZERS.create("diffusion", **BASE)
    plain = STYLIZERS.create("diffusion", **BASE, **NONE)
    content, style = _image(3), _image(4)
    assert np.array_equal(engine.stylize(content, style, []), plain.stylize(content, style, []))


def test_unet_guidance_gradient_is_the_loss_gradient_through_the_unet():
    # the tiny UNet's conv_out is scaled to 1e-3 so that inversion reconstructs; scaled back up, its prediction (and
    # so x0_pred) depends on its input, and a gradient that skipped the UNet (its output detached) would be wrong
    engine = STYLIZERS.create("diffusion", **BASE, **{**NONE, "guidance": True}, guidance_grad="unet", adain=False)
    with torch.no_grad():
        engine.unet.conv_out.weight.mul_(300.0)
        engine.unet.conv_out.bias.mul_(300.0)
    latents = engine.encode(engine._to_tensor([_image(7)], (32, 32)))
    mask = engine.face_mask([[_face((8, 8, 24, 24))]], [(32, 32)], latents.shape[-2:])
    index = 2
    t, a_t = engine.schedule.timesteps[index], engine.schedule.alpha_t[index]
    x = ddim_move_noise(latents, a_t, seed=0)
    eps, grad = engine.guidance_gradient(x, index, mask, latents)

    def loss(z: torch.Tensor) -> float:
        with torch.no_grad():
            _, x0 = engine.schedule.eps_and_x0(engine._unet_call(z, t).float(), z, a_t)
            return float(0.5 * (mask * (x0 - latents) ** 2).double().sum())

    gen = torch.Generator().manual_seed(1)
    h = 1e-2
    for _ in range(3):  # directional derivatives by central differences
        v = mask * torch.randn(x.shape, generator=gen)
        v = v / v.norm()
        fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
        assert abs(float((grad * v).sum()) - fd) < 0.1 * abs(fd), (float((grad * v).sum()), fd)
    _, x0 = engine.schedule.eps_and_x0(eps, x, a_t)
    held_fixed = mask * (x0 - latents) / a_t**0.5  # what a detached UNet output gives
    assert float((grad - held_fixed).norm() / held_fixed.norm()) > 0.1  # 0.15 here; 0 with the output detached


def ddim_move_noise(latents: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """A latent at noise level ``alpha`` around ``latents`` (seeded noise)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return alpha**0.5 * latents + (1 - alpha) ** 0.5 * noise


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_anchoring_lowers_the_masked_loss_at_every_inversion_stride(stride):
    def loss(**options) -> float:
        return _masked_loss({**NONE, "inversion_stride": stride, **options})

    unanchored = loss()
    anchored = loss(anchor=True, anchor_weight=0.5, anchor_steps=[0.0, 1.0])
    assert anchored < 0.5 * unanchored, (stride, anchored, unanchored)


@pytest.mark.parametrize("stride", [2, 3])
def test_anchor_target_is_the_content_latent_at_the_step_s_own_noise_level(stride):
    # the stride-1 inversion has a latent at every level: the reference for what a strided one must rebuild
    full = STYLIZERS.create("diffusion", **BASE, **NONE, adain=False)
    strided = STYLIZERS.create("diffusion", **BASE, **NONE, adain=False, inversion_stride=stride)
    latents = full.encode(full._to_tensor([_image(8)], (32, 32)))
    exact, content = full.content_pass(latents), strided.content_pass(latents)
    ts = full.schedule.timesteps
    for index in range(len(ts) - 1):
        lands_on = exact.trajectory[ts[index + 1]]  # where sampling step `index` lands
        target = strided.anchor_target(content, index)
        torch.testing.assert_close(full.anchor_target(exact, index), lands_on)
        err = float((target - lands_on).norm() / lands_on.norm())
        assert err < 0.01  # (the strided inversion's own latents differ from the stride-1 ones by ~5e-4)
        if (index + 1) % stride == 0:  # an inverted level: the strided inversion's own latent
            torch.testing.assert_close(target, content.trajectory[ts[index + 1]], atol=1e-5, rtol=1e-4)
        else:  # between inverted levels: far closer than the noisier inverted neighbour (0.07-0.43 away)
            noisier = content.trajectory[ts[(index + 1) // stride * stride]]
            assert err < 0.1 * float((noisier - lands_on).norm() / lands_on.norm())
    assert torch.equal(strided.anchor_target(content, len(ts) - 1), latents)  # after the last step: the clean one

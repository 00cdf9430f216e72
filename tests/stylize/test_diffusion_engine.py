"""The diffusion engine behind the Stylizer interface: options, loading, sizes, mosaic, GPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylid_core.config import MosaicConfig
from stylid_core.faces.base import Face
from stylid_core.stylize.base import STYLIZERS, Stylizer
from stylid_core.stylize.diffusion.tiny import TINY_MODEL_NAME, build_tiny_components

FAST = dict(tiny=True, resolution=32, steps=3)


def _image(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _face(box) -> Face:
    x0, y0, x1, y1 = box
    kps = np.array([[x0 + 0.3 * (x1 - x0), y0 + 0.4 * (y1 - y0)]] * 5, np.float32)
    return Face(box=box, keypoints=kps, score=1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(), "'model' is required"),
        (dict(tiny=True, colour=3), "unknown diffusion option"),
        (dict(tiny=True, gamma=1.5), "'gamma'"),
        (dict(tiny=True, temperature=0), "'temperature'"),
        (dict(tiny=True, steps=0), "'steps'"),
        (dict(tiny=True, steps=2.5), "'steps'"),
        (dict(tiny=True, resolution=8), "'resolution'"),
        (dict(tiny=True, dtype="fp8"), "'dtype'"),
        (dict(tiny=True, device="tpu"), "'device'"),
        (dict(tiny=True, guidance_grad="both"), "'guidance_grad'"),
        (dict(tiny=True, guidance_steps=[0.5, 0.2]), "'guidance_steps'"),
        (dict(tiny=True, anchor_steps="early"), "'anchor_steps'"),
        (dict(tiny=True, adain="yes"), "'adain'"),
        (dict(tiny=True, layers=[]), "'layers'"),
        (dict(tiny=True, layers=["down_blocks.9"]), "matches no self-attention layer"),
        (dict(tiny=True, device="cpu", dtype="float16"), "not supported on CPU"),
        (dict(tiny=True, compile_mode="fastest"), "'compile_mode'"),
        (dict(tiny=True, compile_backend="eager", compile_mode="max-autotune"), "inductor' only"),
        (dict(tiny=True, compile=True, compile_backend="no-such-backend"), "not a torch.compile backend"),
        (dict(model="/nonexistent/stable-diffusion"), "cannot load Stable Diffusion model"),
        (dict(model="nobody/no-such-model-xyz"), "cannot load Stable Diffusion model"),
    ],
)
def test_bad_options_raise_value_error_with_a_clear_message(options, message):
    with pytest.raises(ValueError, match=message):
        STYLIZERS.create("diffusion", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_device_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        STYLIZERS.create("diffusion", tiny=True, device="cuda")


@pytest.fixture(scope="module")
def engine():
    return STYLIZERS.create("diffusion", **FAST)


def test_registry_name_and_model_for_reports(engine):
    assert isinstance(engine, Stylizer)
    assert engine.name == "diffusion" and engine.model == TINY_MODEL_NAME
    assert STYLIZERS.create("diffusion", model="tiny", resolution=32, steps=1).model == TINY_MODEL_NAME


@pytest.mark.parametrize(("h", "w"), [(32, 32), (50, 120), (97, 31), (7, 5)])
def test_output_has_the_content_size_for_any_aspect(engine, h, w):
    out = engine.stylize(_image(h * w, h, w), _image(1, 40, 24), [_face((1, 1, max(2, w // 2), max(2, h // 2)))])
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_working_size_keeps_aspect_and_size_multiple(engine):
    assert engine.size_multiple == 4
    assert engine.working_size(100, 200) == (16, 32)
    big = STYLIZERS.create("diffusion", tiny=True, resolution=512, steps=1)
    assert big.working_size(768, 1024) == (384, 512)
    assert big.working_size(10, 5000) == (4, 512)


def test_grayscale_and_alpha_inputs_are_accepted_and_bad_ones_rejected(engine):
    gray = _image(2)[:, :, 0]
    rgba = np.concatenate([_image(3), np.full((32, 32, 1), 255, np.uint8)], axis=2)
    assert engine.stylize(gray, rgba).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="uint8"):
        engine.stylize(_image(4).astype(np.float32), _image(5))
    with pytest.raises(ValueError, match="RGB"):
        engine.stylize(np.zeros((4, 4, 2), np.uint8), _image(5))


def test_batch_of_n_equals_batches_of_one_with_mixed_styles_and_sizes(engine):
    contents = [_image(10), _image(11, 16, 32), _image(12), _image(13)]
    styles = [_image(20), _image(21), _image(21), _image(20)]
    faces = [[_face((4, 4, 20, 20))], [], [], [_face((0, 0, 8, 8))]]
    batched = engine.stylize_batch(contents, styles, faces)
    for c, s, f, out in zip(contents, styles, faces, batched):
        assert np.abs(engine.stylize(c, s, f).astype(int) - out.astype(int)).max() <= 1


def test_loads_a_local_diffusers_folder_offline(tmp_path):
    parts = build_tiny_components()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(parts, name).save_pretrained(tmp_path / name)
    engine = STYLIZERS.create("diffusion", model=str(tmp_path), resolution=32, steps=2)
    assert engine.model == str(tmp_path)
    tiny = STYLIZERS.create("diffusion", tiny=True, resolution=32, steps=2)
    content, style = _image(1), _image(2)
    assert np.array_equal(engine.stylize(content, style), tiny.stylize(content, style))


class PixelVAE(torch.nn.Module):
    """A stand-in "VAE" that keeps images recognisable: 2x2 average pooling into 3 of 4 latent channels."""

    config = SimpleNamespace(scaling_factor=1.0, block_out_channels=(32, 64))

    def encode(self, x):
        pooled = F.avg_pool2d(x, 2)
        latent = torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=latent))

    def decode(self, z):
        return SimpleNamespace(sample=F.interpolate(z[:, :3], scale_factor=2, mode="bilinear"))


def test_mosaic_through_the_diffusion_engine_restores_faces_in_place_without_seams():
    from stylid_core.stylize.mosaic import MosaicRestorer

    engine = STYLIZERS.create("diffusion", tiny=True, resolution=128, steps=3)
    engine.vae, engine.latent_scale = PixelVAE(), 1.0
    yy, xx = np.mgrid[0:64, 0:64]
    content = np.stack([xx * 2, yy * 2, np.full_like(xx, 200)], axis=2).astype(np.uint8)
    content[17:23, 45:51] = (255, 0, 0)  # a red mark in the middle of the small face
    faces = [_face((40.0, 12.0, 56.0, 28.0))]
    calls = []
    inner = engine.stylize_batch

    def spy(canvases, styles, canvas_faces, content_regions=None):
        # the mosaic sends all canvases of a batch through the engine's own batched call
        calls.extend(zip((c.shape for c in canvases), (len(f) for f in canvas_faces), content_regions))
        return inner(canvases, styles, canvas_faces, content_regions=content_regions)

    engine.stylize_batch = spy
    restorer = MosaicRestorer(engine, MosaicConfig(max_face_px=32, target_face_px=32, margin=0.5, layout="canvas"))
    out = restorer.stylize(content, _image(3, 48, 48), faces)
    assert out.shape == content.shape and out.dtype == np.uint8
    ((canvas_shape, n_faces, region),) = calls
    assert canvas_shape[0] == 64 and canvas_shape[1] > 64 and n_faces == 2 and region == (0, 0, 64, 64)
    # the red mark comes back where it was
    red = (out[..., 0].astype(int) - out[..., 1] > 120) & (out[..., 2] < 120)
    ys, xs = np.nonzero(red)
    assert 20 <= len(ys) <= 60
    assert abs(ys.mean() - 19.5) < 1.0 and abs(xs.mean() - 47.5) < 1.0
    # no seam: around the crop's border the output follows the content as closely as elsewhere
    diff = np.abs(out.astype(int) - content.astype(int)).mean(axis=2)
    tile = restorer.plan(64, 64, faces).tiles[0]
    x0, y0, x1, y1 = tile.crop
    border = np.zeros((64, 64), bool)
    border[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = True
    border[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = False
    smooth = np.ones((64, 64), bool)
    smooth[15:25, 43:53] = False
    assert diff[border & smooth].mean() <= 2 * diff[~border & smooth].mean() + 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_engine_on_gpu_in_half_precision_matches_cpu_shapes():
    engine = STYLIZERS.create("diffusion", tiny=True, resolution=64, steps=4, device="cuda", dtype="float16")
    outs = engine.stylize_batch([_image(1, 64, 48), _image(2, 64, 48)], [_image(3)] * 2, [[_face((4, 4, 30, 30))], []])
    assert [o.shape for o in outs] == [(64, 48, 3)] * 2
    features = engine.style_features(_image(3))
    tensors = [t for per_t in features.k.values() for t in per_t.values()]
    assert tensors and all(t.is_cuda and t.dtype == torch.float16 for t in tensors)
    assert engine.style_cache.misses == 1  # the second lookup was a hit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_unet_matches_eager_on_gpu():
    options = dict(tiny=True, resolution=64, steps=3, device="cuda")
    content, style = _image(1, 64, 64), _image(2, 64, 64)
    eager = STYLIZERS.create("diffusion", **options).stylize(content, style)
    compiled = STYLIZERS.create("diffusion", **options, compile=True)
    compiled.stylize(content, style[::-1].copy())  # compile, and a different style: no per-timestep recompiles
    assert np.abs(compiled.stylize(content, style).astype(int) - eager).max() <= 2

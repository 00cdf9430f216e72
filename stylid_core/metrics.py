"""Scores: identity similarity per face, a colour-statistics style distance and a structural content similarity."""

from __future__ import annotations

import cv2
import numpy as np

from stylid_core.faces.base import cosine_similarity
from stylid_core.stylize.classical import lab_statistics

__all__ = ["content_similarity", "cosine_similarity", "identity_similarity", "style_distance"]


def identity_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two identity embeddings from the same backend."""
    return cosine_similarity(a, b)


def style_distance(
    image: np.ndarray, style: np.ndarray, style_statistics: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    """Colour-statistics distance to the style image: the mean over the three CIE Lab channels of the 2-Wasserstein
    distance between per-channel Gaussians, sqrt((mu_a - mu_b)^2 + (sigma_a - sigma_b)^2), in Lab units.

    ``style_statistics``: the style's ``lab_statistics`` when already known (one style serves many images)."""
    m1, s1 = lab_statistics(image)
    m2, s2 = style_statistics if style_statistics is not None else lab_statistics(style)
    return float(np.mean(np.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2)))


def content_similarity(image: np.ndarray, source: np.ndarray) -> float:
    """Structural similarity (SSIM, Gaussian window sigma 1.5) of the two images' greyscale, in [-1, 1].

    Images of different sizes are compared at the smaller one's size.
    """
    a = cv2.cvtColor(np.asarray(image, dtype=np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float64)
    b = cv2.cvtColor(np.asarray(source, dtype=np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float64)
    if a.shape != b.shape:
        b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (0, 0), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())

"""Scores: identity similarity per face, a colour-statistics style distance and a structural content similarity."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from stylid_core.faces.base import cosine_similarity
from stylid_core.stylize.classical import lab_statistics

# The version of the measures that the score stage writes (run.json's ``metrics_version``): an output without it
# was measured by version 1 (``style_distance`` the Lab colour statistics). The gate compares only equal versions.
METRICS_VERSION = 1

__all__ = [
    "METRICS_VERSION",
    "PhotoDetailCorrelation",
    "content_similarity",
    "cosine_similarity",
    "identity_similarity",
    "photo_detail_correlation",
    "style_distance",
]


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


@dataclass(frozen=True)
class PhotoDetailCorrelation:
    """How much of a face's own detail is the photo's: the correlation, inside the face box, of the output's and the
    source's luminance detail in two bands. ``fine``: luminance minus its Gaussian blur at ``sigma``; ``mid``: the
    blur at ``sigma`` minus the blur at ``3 * sigma``, with ``sigma = max(1, face px / 28)`` (face px: the box's
    longer side). A copy of the photo gives 1.0; a face re-rendered in the painting's strokes gives much less. Null
    (None) where either side has no detail in the band (a constant patch), or the box is empty."""

    fine: float | None
    mid: float | None


def _luminance(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        return image.astype(np.float32)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if den < 1e-6 * a.size:
        return None
    return float(np.clip(np.dot(a, b) / den, -1.0, 1.0))


def photo_detail_correlation(
    output: np.ndarray,
    source: np.ndarray,
    box: tuple[float, float, float, float],
    output_box: tuple[float, float, float, float] | None = None,
) -> PhotoDetailCorrelation:
    """``PhotoDetailCorrelation`` of one face: ``box`` (x0, y0, x1, y1) in ``source`` pixels, ``output_box`` the same
    face in ``output`` pixels (default: ``box``, for an output of the source's size). The bands are computed on a
    region around the box (so the blur sees real neighbours, not a border), then cut to the box; an output box of
    another size is resized to the source's box first."""
    output_box = box if output_box is None else output_box
    src = _luminance(source)
    out = _luminance(output)
    x0, y0, x1, y1 = (float(v) for v in box)
    face_px = max(x1 - x0, y1 - y0)
    if face_px < 2:
        return PhotoDetailCorrelation(None, None)
    sigma = max(1.0, face_px / 28.0)
    pad = int(np.ceil(3 * 3 * sigma))

    def region(image: np.ndarray, b: tuple[float, float, float, float], size: tuple[int, int] | None):
        bx0, by0, bx1, by1 = (int(round(v)) for v in b)
        h, w = image.shape[:2]
        bx0, by0 = max(0, min(bx0, w)), max(0, min(by0, h))
        bx1, by1 = max(bx0, min(bx1, w)), max(by0, min(by1, h))
        if bx1 - bx0 < 2 or by1 - by0 < 2:
            return None
        scale = 1.0 if size is None else size[0] / (bx1 - bx0)
        p = int(np.ceil(pad / max(scale, 1e-6)))
        rx0, ry0, rx1, ry1 = max(0, bx0 - p), max(0, by0 - p), min(w, bx1 + p), min(h, by1 + p)
        crop = image[ry0:ry1, rx0:rx1]
        inner = (bx0 - rx0, by0 - ry0, bx1 - rx0, by1 - ry0)
        if size is not None and (bx1 - bx0, by1 - by0) != size:
            sx, sy = size[0] / (bx1 - bx0), size[1] / (by1 - by0)
            crop = cv2.resize(
                crop,
                (max(1, round(crop.shape[1] * sx)), max(1, round(crop.shape[0] * sy))),
                interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_CUBIC,
            )
            ix0, iy0 = round(inner[0] * sx), round(inner[1] * sy)
            inner = (ix0, iy0, ix0 + size[0], iy0 + size[1])
        return crop, inner

    got_src = region(src, (x0, y0, x1, y1), None)
    if got_src is None:
        return PhotoDetailCorrelation(None, None)
    src_crop, src_inner = got_src
    size = (src_inner[2] - src_inner[0], src_inner[3] - src_inner[1])
    got_out = region(out, output_box, size)
    if got_out is None:
        return PhotoDetailCorrelation(None, None)
    out_crop, out_inner = got_out

    def bands(crop: np.ndarray, inner: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        b1 = cv2.GaussianBlur(crop, (0, 0), sigma)
        b3 = cv2.GaussianBlur(crop, (0, 0), 3 * sigma)
        ix0, iy0, ix1, iy1 = inner
        cut = np.s_[iy0:iy1, ix0:ix1]
        return (crop - b1)[cut], (b1 - b3)[cut]

    s_fine, s_mid = bands(src_crop, src_inner)
    o_fine, o_mid = bands(out_crop, out_inner)
    if s_fine.shape != o_fine.shape:  # a box at the image's edge: compare the shared part
        h, w = min(s_fine.shape[0], o_fine.shape[0]), min(s_fine.shape[1], o_fine.shape[1])
        s_fine, s_mid, o_fine, o_mid = (x[:h, :w] for x in (s_fine, s_mid, o_fine, o_mid))
    return PhotoDetailCorrelation(_correlation(o_fine, s_fine), _correlation(o_mid, s_mid))

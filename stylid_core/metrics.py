"""Scores: identity similarity per face, how much of a face's detail is the photo's, a colour-statistics distance
and a structural content similarity. The learned style distance is ``stylid_core.style_judge``.

``colour_distance`` was called ``style_distance`` before metrics version 2: a photo recoloured towards the painting
scores as near as a painted one, so it measures colour, not style (issue "Faces that stay painted")."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from stylid_core.faces.base import cosine_similarity
from stylid_core.stylize.classical import lab_statistics

__all__ = [
    "METRICS_VERSION",
    "PhotoDetailCorrelation",
    "content_similarity",
    "face_halo",
    "cosine_similarity",
    "identity_similarity",
    "photo_detail_correlation",
    "colour_distance",
]

#: what the score columns mean, recorded in ``run.json`` as ``metrics_version`` (absent: 1). 2: ``style_distance``
#: is the learned distance (``stylid_core.style_judge``), the Lab figure is ``colour_distance``, face rows carry
#: ``photo_detail_fine``/``photo_detail_mid``. The gate compares only outputs of one version.
METRICS_VERSION = 2


def identity_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two identity embeddings from the same backend."""
    return cosine_similarity(a, b)


def colour_distance(
    image: np.ndarray, style: np.ndarray, style_statistics: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    """Colour-statistics distance to the style image (not a style judge: see the module doc): the mean over the
    three CIE Lab channels of the 2-Wasserstein distance between per-channel Gaussians,
    sqrt((mu_a - mu_b)^2 + (sigma_a - sigma_b)^2), in Lab units.

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


def _luminance_around(
    image: np.ndarray, box: tuple[float, float, float, float], pad: int
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """The luminance of ``box`` (clipped to the image) grown by ``pad`` pixels a side, and the box's place in that
    crop; None for a box under 2 px. Only the crop is converted, not the whole image."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
    y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    rx0, ry0, rx1, ry1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    crop = np.asarray(image[ry0:ry1, rx0:rx1], dtype=np.uint8)
    lum = crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return lum.astype(np.float32), (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0)


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
    face_px = max(float(box[2]) - float(box[0]), float(box[3]) - float(box[1]))
    if face_px < 2:
        return PhotoDetailCorrelation(None, None)
    sigma = max(1.0, face_px / 28.0)
    pad = int(np.ceil(3 * 3 * sigma))  # the widest blur's reach, so the box's bands see real neighbours

    got_src = _luminance_around(source, box, pad)
    if got_src is None:
        return PhotoDetailCorrelation(None, None)
    src_crop, src_inner = got_src
    size = (src_inner[2] - src_inner[0], src_inner[3] - src_inner[1])
    out_w = max(float(output_box[2]) - float(output_box[0]), 1e-6)
    got_out = _luminance_around(output, output_box, int(np.ceil(pad * out_w / size[0])))
    if got_out is None:
        return PhotoDetailCorrelation(None, None)
    out_crop, out_inner = got_out
    out_size = (out_inner[2] - out_inner[0], out_inner[3] - out_inner[1])
    if out_size != size:  # the output's box brought to the source's box size
        sx, sy = size[0] / out_size[0], size[1] / out_size[1]
        out_crop = cv2.resize(
            out_crop,
            (max(1, round(out_crop.shape[1] * sx)), max(1, round(out_crop.shape[0] * sy))),
            interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_CUBIC,
        )
        ix0, iy0 = round(out_inner[0] * sx), round(out_inner[1] * sy)
        out_inner = (ix0, iy0, ix0 + size[0], iy0 + size[1])

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


def _grown_boxes_mask(shape: tuple[int, int], boxes, grow: float) -> np.ndarray:
    """True inside each box grown by ``grow`` of its size in all (``grow / 2`` a side), clipped to the image."""
    h, w = shape
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        gx, gy = grow / 2 * (x1 - x0), grow / 2 * (y1 - y0)
        mask[
            max(0, int(y0 - gy)) : max(0, int(np.ceil(y1 + gy))), max(0, int(x0 - gx)) : max(0, int(np.ceil(x1 + gx)))
        ] = True
    return mask


#: the halo ring: from the face box grown by HALO_INNER (the face's own mask may reach that far) to grown by HALO_OUTER
HALO_INNER, HALO_OUTER = 0.5, 2.0


def face_halo(output: np.ndarray, plain: np.ndarray, boxes) -> float | None:
    """The halo around faces: the mean absolute difference (0-255, all channels) between ``output`` and the plain
    stylization ``plain`` in the ring around the faces, from each box grown by ``HALO_INNER`` (50%: where a face's own
    mask may reach) to grown by ``HALO_OUTER`` (200%), outside every face's inner box. 0 means that around the faces
    the output is the plain stylization; a face restore that reaches too far (a square feather over the whole tile,
    a face mask with a wide margin) shows here, where a mean over the whole image would dilute it. None without a
    ring (no faces, or faces covering the image)."""
    shape = output.shape[:2]
    ring = _grown_boxes_mask(shape, boxes, HALO_OUTER) & ~_grown_boxes_mask(shape, boxes, HALO_INNER)
    if not ring.any():
        return None
    diff = np.abs(np.asarray(output, np.int16) - np.asarray(plain, np.int16))
    return float(diff[ring].mean())

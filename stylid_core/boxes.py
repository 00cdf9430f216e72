"""Face boxes as (x0, y0, x1, y1) in pixels: overlap measures shared by the score stage, the gate and face merging."""

from __future__ import annotations

import numpy as np

__all__ = ["box_iou", "pairwise_iou", "rowwise_iou"]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes whose last axis is x0, y0, x1, y1, broadcast over the other axes; 0 where a union is empty."""
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    union = (
        (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    )
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _boxes(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1, 4)


def pairwise_iou(a, b) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4): an (N, M) array."""
    return _iou(_boxes(a)[:, None, :], _boxes(b)[None, :, :])


def rowwise_iou(a, b) -> np.ndarray:
    """IoU of row i of ``a`` with row i of ``b``, both (N, 4): an (N,) array."""
    return _iou(_boxes(a), _boxes(b))


def box_iou(a, b) -> float:
    """IoU of two boxes."""
    return float(_iou(_boxes(a)[0], _boxes(b)[0]))

"""``centered``: one face per image, the centred square, for datasets of pre-cropped aligned faces.

No detector runs: every image is taken to be one face filling its middle (as in aligned face crops, FFHQ-style),
with keypoints at fixed fractions of the box. The embedding is the face's 8x8 grey thumbnail, mean-removed
and L2-normalised: a crude identity signal (two crops of one photo match; a restyled crop drifts), cheap enough
that a run measures the pipeline itself (``benchmarks/bench_scale.py``). Not a face recognizer: use ``dlib`` or
``insightface`` for identity scores that mean anything.
"""

from __future__ import annotations

import cv2
import numpy as np

from stylid_core.config import FacesConfig
from stylid_core.faces.base import FACE_ANALYZERS, Face, FaceAnalyzer

#: keypoints as fractions of the box (eye centres, nose tip, mouth corners), the ArcFace template's layout
_KEYPOINTS = np.array([[0.34, 0.46], [0.66, 0.46], [0.5, 0.64], [0.37, 0.82], [0.63, 0.82]], np.float32)
_SIDE = 8


class CenteredFaceAnalyzer(FaceAnalyzer):
    """Every image holds one face: the centred square of side ``fraction`` times the shorter image side."""

    name = "centered"
    embedding_dim = _SIDE * _SIDE
    match_threshold = 0.3  # 1 - cosine of the thumbnails
    distance_kind = "cosine"

    def __init__(self, fraction: float = 0.8) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        side = self.fraction * min(h, w)
        x0, y0 = (w - side) / 2, (h - side) / 2
        keypoints = _KEYPOINTS * side + np.array([x0, y0], np.float32)
        return [Face(box=(x0, y0, x0 + side, y0 + side), keypoints=keypoints, score=1.0)]

    def embed(self, image: np.ndarray, keypoints: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(keypoints), self.embedding_dim), np.float32)
        h, w = image.shape[:2]
        for k, kps in enumerate(keypoints):
            # the box back from the keypoints' template positions
            side = float((kps[1, 0] - kps[0, 0]) / (_KEYPOINTS[1, 0] - _KEYPOINTS[0, 0]))
            x0, y0 = kps[0] - _KEYPOINTS[0] * side
            xa, ya = max(0, int(x0)), max(0, int(y0))
            xb, yb = min(w, int(np.ceil(x0 + side))), min(h, int(np.ceil(y0 + side)))
            if xb <= xa or yb <= ya:
                continue
            grey = cv2.cvtColor(np.ascontiguousarray(image[ya:yb, xa:xb]), cv2.COLOR_RGB2GRAY)
            v = cv2.resize(grey, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
            v -= v.mean()
            norm = float(np.linalg.norm(v))
            out[k] = v / norm if norm > 0 else v
        return out


@FACE_ANALYZERS.register("centered")
def _create_centered(config: FacesConfig) -> CenteredFaceAnalyzer:
    return CenteredFaceAnalyzer()

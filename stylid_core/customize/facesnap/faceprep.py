"""Face geometry FaceSnap needs: 68-point landmarks (dlib), aligned face crops, square image framing."""

from __future__ import annotations

import functools
import importlib.util
import os

import cv2
import numpy as np

#: ArcFace's five-point template in a 112 x 112 crop (eyes, nose tip, mouth corners)
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def dlib_models_dir() -> str:
    """The folder of dlib models shipped by ``face_recognition_models`` (located without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed")
    return os.path.join(spec.submodule_search_locations[0], "models")


class DlibLandmarks68:
    """dlib's 68-point shape predictor (and, for whole images, its HOG detector and 128-d face encoder)."""

    def __init__(self, model_dir: str | None = None, upsample: int = 1) -> None:
        import dlib

        d = model_dir or dlib_models_dir()
        self._dlib = dlib
        self.upsample = upsample
        self.predictor = dlib.shape_predictor(os.path.join(d, "shape_predictor_68_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(os.path.join(d, "dlib_face_recognition_resnet_model_v1.dat"))
        self.detector = dlib.get_frontal_face_detector()

    def _rect(self, box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self._dlib.rectangle(x0, y0, x1, y1)

    def landmarks(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """(68, 2) float32 pixel landmarks of the face in ``box`` (x0, y0, x1, y1) of an RGB uint8 image."""
        shape = self.predictor(np.ascontiguousarray(image), self._rect(box))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        """Face boxes, largest first."""
        rects = self.detector(np.ascontiguousarray(image), self.upsample)
        boxes = [(float(r.left()), float(r.top()), float(r.right()), float(r.bottom())) for r in rects]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def embed(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """dlib's 128-d identity embedding of the face in ``box``."""
        shape = self.predictor(np.ascontiguousarray(image), self._rect(box))
        return np.asarray(self.encoder.compute_face_descriptor(np.ascontiguousarray(image), shape), np.float32)


@functools.lru_cache(maxsize=2)
def shared_landmarker(model_dir: str | None = None) -> DlibLandmarks68:
    """One ``DlibLandmarks68`` per process (loading the predictor takes ~0.5 s)."""
    return DlibLandmarks68(model_dir)


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int, zoom: float = 0.8) -> np.ndarray:
    """The face at ``keypoints`` warped onto the ArcFace template in a ``size`` square (zoom < 1: more context)."""
    template = (ARCFACE_TEMPLATE_112 - 56.0) * zoom + 56.0
    template = template * (size / 112.0)
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(keypoints, np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("cannot align face: degenerate keypoints")
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop ``image`` to a square and resize it to ``size`` x ``size`` (matching ``relative_landmarks``)."""
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = image[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def relative_landmarks(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel landmarks -> coordinates relative to the image's square centre crop (0..1)."""
    side = min(height, width)
    offset = np.array([(width - side) // 2, (height - side) // 2], dtype=np.float32)
    return ((np.asarray(points, np.float32) - offset) / side).astype(np.float32)

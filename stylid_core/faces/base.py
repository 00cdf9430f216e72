"""The face record and the ``FaceAnalyzer`` interface every backend implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from stylid_core.boxes import pairwise_iou
from stylid_core.registry import Registry

#: Upper edges (exclusive, in px of the face box's longer side) of the size buckets used in every report.
SIZE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<32", 32),
    ("32-48", 48),
    ("48-64", 64),
    ("64-128", 128),
    (">=128", float("inf")),
)


def size_bucket(size_px: float) -> str:
    """The report bucket of a face whose box's longer side is ``size_px`` pixels."""
    for name, upper in SIZE_BUCKETS:
        if size_px < upper:
            return name
    return SIZE_BUCKETS[-1][0]


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the image it was found in.

    ``keypoints`` are the five (x, y) points of the backend's 5-point model, which its embedder aligns from:
    insightface/ArcFace order (eye centres, nose tip, mouth corners) for ``insightface``; dlib's order (two
    corners of each eye, base of the nose) for ``dlib``. Stylization keeps geometry, so the same keypoints
    locate the face in a stylized output. Compare keypoints only within one backend.
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    keypoints: np.ndarray  # (5, 2) float32
    score: float
    embedding: np.ndarray | None = None  # backend-native embedding (128-d dlib, 512-d ArcFace)
    landmarks: np.ndarray | None = field(default=None, repr=False)  # dense landmarks when the backend has them

    @property
    def size_px(self) -> float:
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, y1 - y0))

    @property
    def bucket(self) -> str:
        return size_bucket(self.size_px)

    def to_dict(self) -> dict:
        """A JSON-serialisable form, used to carry faces between pipeline stages."""
        return {
            "box": [float(v) for v in self.box],
            "keypoints": np.asarray(self.keypoints, dtype=float).round(3).tolist(),
            "score": float(self.score),
            "embedding": None if self.embedding is None else np.asarray(self.embedding, dtype=float).tolist(),
            "size_px": self.size_px,
            "size_bucket": self.bucket,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Face:
        emb = d.get("embedding")
        return cls(
            box=tuple(float(v) for v in d["box"]),  # type: ignore[arg-type]
            keypoints=np.asarray(d["keypoints"], dtype=np.float32),
            score=float(d["score"]),
            embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
        )


#: Two detections whose IoU is above this are one face seen twice (the higher-score one is kept).
DUPLICATE_IOU = 0.5
#: Two detections whose intersection covers at least this share of the smaller box are one face, the larger box a
#: loose detection around it (dlib HOG with upsampling finds 112 px boxes over 45 px faces); the smaller is kept.
NESTED_COVER = 0.6


def _intersection_over_smaller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection area of boxes ``a`` (N, 4) and ``b`` (M, 4) over the smaller box's area."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    smaller = np.minimum(area_a, area_b)
    return np.where(smaller > 0, ix * iy / np.where(smaller > 0, smaller, 1), 0.0)


def _box_area(face: Face) -> float:
    x0, y0, x1, y1 = face.box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def merge_detections(
    faces: list[Face], duplicate_iou: float = DUPLICATE_IOU, nested_cover: float = NESTED_COVER
) -> list[Face]:
    """One face per person: duplicate and nested detections merged, before any mask or tile is made.

    A pair is one face when its IoU is above ``duplicate_iou`` (kept: the higher score) or when their intersection
    covers at least ``nested_cover`` of the smaller box (kept: the smaller, tighter box). The kept ``Face`` is
    returned whole, so its box, keypoints, landmarks and embedding stay those of one detection. Order of the input
    is kept for the survivors.
    """
    if len(faces) < 2:
        return list(faces)
    boxes = np.array([f.box for f in faces], dtype=np.float64)
    iou = pairwise_iou(boxes, boxes)
    cover = _intersection_over_smaller(boxes, boxes)
    areas = [_box_area(f) for f in faces]
    kept: list[int] = []
    for i in sorted(range(len(faces)), key=lambda k: -faces[k].score):  # best score first
        keep_i = True
        for slot, j in enumerate(kept):
            if iou[i, j] > duplicate_iou:
                keep_i = False  # j scored at least as high
            elif cover[i, j] >= nested_cover:
                if areas[i] < areas[j]:
                    kept[slot] = i  # i is the tighter box inside j: it replaces j
                keep_i = False
            else:
                continue
            break
        if keep_i:
            kept.append(i)
    survivors = set(kept)
    return [f for k, f in enumerate(faces) if k in survivors]


class FaceAnalyzer(abc.ABC):
    """Detects faces, places five keypoints and computes identity embeddings.

    Subclasses set ``name``, ``embedding_dim`` and ``match_threshold`` (the backend's documented distance under
    which two embeddings are the same person, in the backend's native distance, see ``distance``).
    """

    name: str = "abstract"
    embedding_dim: int = 0
    match_threshold: float = 0.0
    #: "euclidean" (dlib) or "cosine" (ArcFace: 1 - cosine similarity)
    distance_kind: str = "euclidean"

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, with box, keypoints and score (no embedding yet)."""

    @abc.abstractmethod
    def embed(self, image: np.ndarray, keypoints: list[np.ndarray]) -> np.ndarray:
        """Embeddings (N, D) of the faces at ``keypoints`` (each (5, 2)) in ``image``.

        The face is aligned from its keypoints, so the same call embeds "the same region" of another image
        with the same geometry (a stylized output), whether or not a detector would find a face there.
        """

    def analyze(self, image: np.ndarray, max_faces: int | None = None) -> list[Face]:
        """Detect, then embed every detected face (the largest ``max_faces`` when given)."""
        faces = self.detect(image)
        faces.sort(key=lambda f: -f.size_px)
        if max_faces is not None:
            faces = faces[:max_faces]
        if faces:
            embs = self.embed(image, [f.keypoints for f in faces])
            for face, emb in zip(faces, embs):
                face.embedding = emb
        return faces

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """The backend's native distance between two embeddings."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if self.distance_kind == "cosine":
            return 1.0 - cosine_similarity(a, b)
        return float(np.linalg.norm(a - b))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else 0.0


FACE_ANALYZERS: Registry[FaceAnalyzer] = Registry(
    "face analyzer",
    modules={
        "dlib": "stylid_core.faces.dlib_backend",
        "insightface": "stylid_core.faces.insightface_backend",
        "centered": "stylid_core.faces.centered_backend",
    },
)

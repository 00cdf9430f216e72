"""Calibrating a face backend's match threshold on labelled photo pairs (same person or not).

``pair_distances`` embeds the largest face of every photo named in a ``pairs.csv`` (``person_a_file,person_b_file,
same``, paths relative to its folder, as in ``../shared/faces``) and returns the backend's native distance of each
same- and different-person pair; ``calibrate`` gives the best-accuracy and equal-error thresholds and the range that
separates the two sets without error. ``benchmarks/calibrate_face_threshold.py`` prints them for a backend; the
thresholds recorded in the backends (``insightface_backend.CALIBRATED_RECOGNIZERS``) come from it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from stylid_core.faces.base import FaceAnalyzer


def pair_distances(analyzer: FaceAnalyzer, faces_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Distances of the same-person and different-person pairs of ``pairs.csv``, and the photos with no face."""
    with open(faces_dir / "pairs.csv") as fh:
        pairs = [(r["person_a_file"], r["person_b_file"], r["same"] == "1") for r in csv.DictReader(fh)]
    embeddings, missing = {}, []
    for name in sorted({p for a, b, _ in pairs for p in (a, b)}):
        image = cv2.cvtColor(cv2.imread(str(faces_dir / name)), cv2.COLOR_BGR2RGB)
        faces = analyzer.analyze(image, max_faces=1)
        if not faces:  # a tight face chip (the 150 px dlib "johns"): detectors want some context around the face
            pad = image.shape[0] // 2
            faces = analyzer.analyze(cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT), max_faces=1)
        if faces:
            embeddings[name] = faces[0].embedding
        else:
            missing.append(name)
    same, diff = [], []
    for a, b, is_same in pairs:
        if a in embeddings and b in embeddings:
            (same if is_same else diff).append(analyzer.distance(embeddings[a], embeddings[b]))
    return np.array(same), np.array(diff), missing


def calibrate(same: np.ndarray, diff: np.ndarray) -> dict[str, float]:
    """Best-accuracy and equal-error thresholds ("same" when distance < threshold) and the error-free gap."""
    candidates = np.unique(np.concatenate([same, diff]))
    mids = (candidates[:-1] + candidates[1:]) / 2
    acc = np.array([((same < t).sum() + (diff >= t).sum()) / (len(same) + len(diff)) for t in mids])
    far = np.array([(diff < t).mean() for t in mids])
    frr = np.array([(same >= t).mean() for t in mids])
    eer_i = int(np.argmin(np.abs(far - frr)))
    best = np.flatnonzero(acc == acc.max())
    return {
        "best_accuracy": float(acc.max()),
        "best_accuracy_threshold": float(np.median(mids[best])),
        "eer": float((far[eer_i] + frr[eer_i]) / 2),
        "eer_threshold": float(mids[eer_i]),
        "gap_low": float(same.max()),
        "gap_high": float(diff.min()),
    }

"""Calibrate a face backend's match threshold on same- and different-person photo pairs.

Reads ``../shared/faces/pairs.csv`` (741 pairs of the 39 photos in ``people/``: 36 same-person, 705 different;
``STYLID_TEST_FACES`` overrides the folder) and, through ``stylid_core.faces.calibration``, embeds the largest face
of every photo with the chosen backend (a photo with none found is retried with a black border of half its height,
which the tight 150 px face chips of dlib's "johns" need). It prints, for the backend's native distance: the same-
and different-person distributions, the threshold of best accuracy, the equal-error threshold, the range of
thresholds that separate the two sets without error, and the accuracy, false-match and false-non-match rates at
the backend's current ``match_threshold``.

    python benchmarks/calibrate_face_threshold.py --backend insightface --model-dir ../shared/models/insightface_small
    python benchmarks/calibrate_face_threshold.py --backend dlib
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from stylid_core.config import FacesConfig
from stylid_core.faces import create_face_analyzer
from stylid_core.faces.calibration import calibrate, pair_distances

FACES_DIR = Path(os.environ.get("STYLID_TEST_FACES", Path(__file__).resolve().parents[1].parent / "shared" / "faces"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="insightface", choices=["insightface", "dlib"])
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    analyzer = create_face_analyzer(FacesConfig(backend=args.backend, model_dir=args.model_dir, upsample=1))
    same, diff, missing = pair_distances(analyzer, FACES_DIR)
    print(f"{analyzer!r}: {analyzer.embedding_dim}-d, {analyzer.distance_kind} distance")
    print(f"photos with no face found: {missing or 'none'}")
    for label, d in (("same person", same), ("different people", diff)):
        print(f"  {label:17s} n={len(d):4d} mean {d.mean():.3f} min {d.min():.3f} max {d.max():.3f}"
              f" p5 {np.percentile(d, 5):.3f} p95 {np.percentile(d, 95):.3f}")  # fmt: skip
    fig = calibrate(same, diff)
    print(f"best accuracy {fig['best_accuracy']:.4f} at threshold {fig['best_accuracy_threshold']:.3f}; "
          f"equal error rate {fig['eer']:.4f} at {fig['eer_threshold']:.3f}; "
          f"error-free gap: {'none' if fig['gap_low'] >= fig['gap_high'] else ''}"
          f"({fig['gap_low']:.3f}, {fig['gap_high']:.3f})")  # fmt: skip
    t = analyzer.match_threshold
    acc = ((same < t).sum() + (diff >= t).sum()) / (len(same) + len(diff))
    print(f"at the backend's match_threshold {t:.3f}: accuracy {acc:.4f}, false match {(diff < t).mean():.4f}, "
          f"false non-match {(same >= t).mean():.4f}")  # fmt: skip


if __name__ == "__main__":
    main()

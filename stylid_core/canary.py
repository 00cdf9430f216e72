"""Pick a canary set from a scored dataset: few images whose faces give every size bucket of the gate
(``stylid_core.gate``) at least ``min_faces`` faces, so a team does not hand-pick it (``stylid canary``).

Pure: takes the faces table (``image_id``, ``face_index``, ``size_bucket``) and the ids of the images that may be
picked; no I/O. The pick is greedy and stratified: each step takes the image that adds the most faces still needed
(a face counts only while its bucket is short of ``min_faces``), the rarest short bucket first among equals, ties
broken by a seeded shuffle, so the same dataset and seed always give the same manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stylid_core.faces.base import SIZE_BUCKETS

BUCKETS = tuple(name for name, _ in SIZE_BUCKETS)


@dataclass
class CanaryPick:
    """The picked images (in pick order) and, per size bucket, the faces they have and the faces the dataset has."""

    image_ids: list[str]
    faces: dict[str, int]  # bucket -> faces of the picked images
    available: dict[str, int]  # bucket -> faces of every pickable image
    min_faces: int
    short: list[str] = field(default_factory=list)  # sought buckets under min_faces even with the pick
    buckets: list[str] = field(default_factory=lambda: list(BUCKETS))  # the buckets sought

    def to_dict(self) -> dict:
        return {"images": len(self.image_ids), "faces": self.faces, "available": self.available,
                "min_faces": self.min_faces, "short": self.short, "buckets": self.buckets}  # fmt: skip


def bucket_counts(faces: pd.DataFrame) -> pd.DataFrame:
    """Faces per image and size bucket (one row per image, one column per bucket of ``BUCKETS``), each face once:
    rows repeated under one ``(image_id, face_index)`` (a shard written twice) count once."""
    if faces.empty:
        return pd.DataFrame(columns=list(BUCKETS), dtype=int)
    unique = faces.drop_duplicates(["image_id", "face_index"]) if "face_index" in faces else faces
    counts = pd.crosstab(unique["image_id"].astype(str), unique["size_bucket"].astype(str))
    return counts.reindex(columns=list(BUCKETS), fill_value=0).astype(int)


def pick_canary(
    faces: pd.DataFrame,
    image_ids,
    min_faces: int,
    seed: int = 0,
    max_images: int | None = None,
    buckets: list[str] | None = None,
) -> CanaryPick:
    """Greedily few of ``image_ids`` whose faces reach ``min_faces`` in every size bucket of ``buckets`` (default:
    all of ``BUCKETS``) the dataset can fill; buckets the whole dataset cannot fill are taken as far as it goes and
    named in ``short``. A bucket not in ``buckets`` is not sought (its faces are counted as they come). Images
    without faces are never picked. ``max_images`` bounds the pick (what is short then is named too)."""
    if min_faces < 1:
        raise ValueError(f"min_faces must be at least 1, got {min_faces}")
    wanted = list(BUCKETS) if buckets is None else list(dict.fromkeys(buckets))
    unknown = [b for b in wanted if b not in BUCKETS]
    if unknown or not wanted:
        raise ValueError(f"buckets {unknown or wanted}: choose among {', '.join(BUCKETS)}")
    allowed = sorted({str(i) for i in image_ids})
    counts = bucket_counts(faces[faces["image_id"].astype(str).isin(allowed)] if not faces.empty else faces)
    order = np.random.default_rng(seed).permutation(len(counts))
    counts = counts.iloc[order]
    matrix = counts.to_numpy(dtype=np.int64)
    ids = list(counts.index)
    available = matrix.sum(axis=0) if len(ids) else np.zeros(len(BUCKETS), dtype=np.int64)
    need = np.array([min_faces if b in wanted else 0 for b in BUCKETS], dtype=np.int64)
    have = np.zeros(len(BUCKETS), dtype=np.int64)
    taken = np.zeros(len(ids), dtype=bool)
    picked: list[str] = []
    # rarer buckets weigh more among images adding equally many faces: they are the ones few images can fill
    rarity = 1.0 / np.maximum(available, 1)
    while max_images is None or len(picked) < max_images:
        short = np.maximum(need - have, 0)
        if not short.any():
            break
        gain = np.minimum(matrix, short).astype(float)
        score = gain.sum(axis=1) + (gain * rarity).sum(axis=1) / (len(BUCKETS) + 1)
        score[taken] = -1.0
        if not len(ids) or score.max() <= 0:
            break
        best = int(np.argmax(score))  # first of the maxima: the seeded order breaks ties
        taken[best] = True
        picked.append(ids[best])
        have += matrix[best]
    names = list(BUCKETS)
    return CanaryPick(
        image_ids=picked,
        faces={b: int(have[k]) for k, b in enumerate(names)},
        available={b: int(available[k]) for k, b in enumerate(names)},
        min_faces=min_faces,
        short=[b for k, b in enumerate(names) if b in wanted and have[k] < min_faces],
        buckets=[b for b in BUCKETS if b in wanted],
    )


def format_pick(pick: CanaryPick) -> str:
    """Per bucket the faces picked (of those available), and the buckets that could not reach ``min_faces``."""
    lines = [f"{'bucket':>7} {'faces':>6} {'available':>9}  min_faces {pick.min_faces}"]
    for b in BUCKETS:
        mark = "  (not sought)" if b not in pick.buckets else "" if pick.faces[b] >= pick.min_faces else "  SHORT"
        lines.append(f"{b:>7} {pick.faces[b]:>6} {pick.available[b]:>9}{mark}")
    lines.append(f"{len(pick.image_ids)} images, {sum(pick.faces.values())} faces")
    if pick.short:
        lines.append("could not reach min_faces: " + ", ".join(f"{b} ({pick.faces[b]} faces)" for b in pick.short))
    return "\n".join(lines)

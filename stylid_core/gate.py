"""The regression gate: a scored output against a baseline, per face-size bucket, on the ids both share.

Pure pandas/numpy (no Ray): ``stylid score --baseline RUN`` calls ``compare_runs`` on the two outputs' ``metrics/``
and ``faces/`` tables and exits 1 when it fails.

Figures, per size bucket and over all faces (``all``):

- ``id_sim`` (mean identity similarity), ``id_match`` (match rate) and ``redetected`` (re-detection rate) are
  per face. Faces pair by geometry within each image both runs scored (status ``ok`` in both): the assignment of
  boxes with the largest total IoU, pairs needing IoU >= ``pair_iou`` (``face_index`` orders faces by size, so it
  cannot pair them); a face's bucket is its bucket in the baseline. Faces left without a partner are lost (baseline)
  or new (candidate), counted per bucket; their share of all faces, or of a bucket's faces, fails the gate beyond
  ``max_unpaired_share`` (and their count beyond ``max_unpaired_faces``, where set).
- ``style_distance`` (learned, lower is better), ``colour_distance`` (Lab, lower is better) and ``content_ssim``
  are per image; an image counts in every bucket it has a paired face in.

Noise is handled by pairing: each figure's difference (candidate - baseline) is averaged over the pairs, with a
Student-t confidence interval of that mean (``confidence``, default 95%) from the paired differences (for the
yes/no figures ``id_match`` and ``redetected``: the Agresti-Min interval of matched proportions), clipped to the
range the difference can take. A figure fails only when the bucket has at least ``min_faces`` paired faces
(``min_faces_all`` for ``all``; a smaller bucket is folded into the next larger one, see ``fold_small_buckets``),
its drop (the worsening, in the figure's own units) is beyond ``abs_drop`` or its drop relative to the baseline
mean is beyond ``rel_drop``, *and* the interval excludes zero on the worse side (the drop is not noise). Besides the
figures: ids only in the baseline, ids only in the candidate, and rows whose status got worse (``ok`` in the
baseline, anything else now), each checked against its own maximum. Every id of either side is reported: none is
dropped silently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stylid_core.boxes import pairwise_iou
from stylid_core.config import ConfigError
from stylid_core.faces.base import SIZE_BUCKETS

#: figure -> (table, column, higher is better, what it is)
FIGURES: dict[str, tuple[str, str, bool, str]] = {
    "id_sim": ("faces", "id_sim", True, "mean identity similarity"),
    "id_match": ("faces", "id_match", True, "match rate"),
    "redetected": ("faces", "redetected", True, "re-detection rate"),
    "style_distance": ("metrics", "style_distance", False, "learned style distance"),
    "colour_distance": ("metrics", "colour_distance", False, "colour distance (Lab)"),
    "content_ssim": ("metrics", "content_ssim", True, "content similarity"),
}
#: figure -> (lowest, highest) value it can take; its paired difference lies in [lowest - highest, highest - lowest]
#: and so does its interval (a t interval of a few pairs can reach beyond it)
FIGURE_RANGES: dict[str, tuple[float, float]] = {
    "id_sim": (-1.0, 1.0),  # cosine
    "id_match": (0.0, 1.0),
    "redetected": (0.0, 1.0),
    "style_distance": (0.0, math.inf),
    "colour_distance": (0.0, math.inf),
    "content_ssim": (-1.0, 1.0),
}
#: yes/no figures: their interval is one for a difference of matched proportions, not a t interval (which is
#: zero-wide when every pair changed the same way, e.g. two faces that both stopped matching: [-1, -1])
BINARY_FIGURES = frozenset({"id_match", "redetected"})
INTERVAL_METHOD = (
    "Student-t interval of the mean paired difference (candidate - baseline); for id_match and redetected the"
    " Agresti-Min interval of the difference of matched proportions"
)


class GateInputError(ValueError):
    """Two outputs that cannot be compared (no shared ids, another face backend or scoring config, ...)."""


@dataclass
class FigureGate:
    """Largest tolerated drop of one figure: absolute (in the figure's units) and relative to the baseline mean.
    ``None`` turns that bound off."""

    abs_drop: float | None = None
    rel_drop: float | None = None

    def __post_init__(self) -> None:
        for name in ("abs_drop", "rel_drop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"gate: {name} must be a number >= 0 or null, got {v!r}")


@dataclass
class GateConfig:
    """Thresholds of the regression gate (``gate:`` in ``configs/nightly_score.yaml``)."""

    confidence: float = 0.95  # of the interval of each paired difference
    min_faces: int = 20  # paired faces a size bucket needs to be gated alone (fewer: folded into the next larger)
    min_faces_all: int = 10  # paired faces the `all` bucket needs to be gated (under it nothing is gated: exit 3)
    pair_iou: float = 0.5  # a face pairs with a face of the other run only if the boxes overlap this much
    max_unpaired_share: float | None = 0.02  # (lost + new faces) / all faces of the images scored in both, and the
    # same share in each size bucket (so in a bucket of fewer than 1 / share faces, 50 by default, any lost face fails)
    max_unpaired_faces: int | None = None  # lost + new faces over all buckets, whatever the share
    max_status_worse: int | None = 0  # rows ok in the baseline and not ok now
    max_only_in_baseline: int | None = 0  # ids the candidate lost
    max_only_in_candidate: int | None = None  # ids new in the candidate (reported; null: never fails)
    history_runs: int = 14  # nights in the report's trend plots (--history); the drift base's median (no --reference)
    id_sim: FigureGate = field(default_factory=lambda: FigureGate(abs_drop=0.02, rel_drop=0.03))
    id_match: FigureGate = field(default_factory=lambda: FigureGate(abs_drop=0.05))
    redetected: FigureGate = field(default_factory=lambda: FigureGate(abs_drop=0.05))
    style_distance: FigureGate = field(default_factory=lambda: FigureGate(rel_drop=0.05))
    colour_distance: FigureGate = field(default_factory=lambda: FigureGate(abs_drop=0.5, rel_drop=0.10))
    content_ssim: FigureGate = field(default_factory=lambda: FigureGate(abs_drop=0.03, rel_drop=0.05))

    def __post_init__(self) -> None:
        for name in FIGURES:
            value = getattr(self, name)
            if isinstance(value, dict):
                unknown = sorted(set(value) - {"abs_drop", "rel_drop"})
                if unknown:
                    raise ConfigError(
                        f"unknown config key(s): gate.{name}.{', '.join(unknown)}; known: abs_drop, rel_drop"
                    )
                setattr(self, name, FigureGate(**value))
            elif not isinstance(value, FigureGate):
                raise ConfigError(f"gate.{name} must be a mapping with abs_drop and rel_drop, got {value!r}")
        if not (isinstance(self.confidence, (int, float)) and 0.5 <= self.confidence < 1):
            raise ConfigError(f"gate.confidence must be in [0.5, 1), got {self.confidence!r}")
        for name in ("min_faces", "min_faces_all"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
                raise ConfigError(f"gate.{name} must be an integer >= 2 (an interval needs two pairs), got {v!r}")
        if not (isinstance(self.pair_iou, (int, float)) and 0 < self.pair_iou <= 1):
            raise ConfigError(f"gate.pair_iou must be in (0, 1], got {self.pair_iou!r}")
        v = self.max_unpaired_share
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
            raise ConfigError(f"gate.max_unpaired_share must be in [0, 1] or null, got {v!r}")
        if not (isinstance(self.history_runs, int) and self.history_runs >= 1):
            raise ConfigError(f"gate.history_runs must be an integer >= 1, got {self.history_runs!r}")
        for name in ("max_status_worse", "max_only_in_baseline", "max_only_in_candidate", "max_unpaired_faces"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ConfigError(f"gate.{name} must be an integer >= 0 or null, got {v!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GateConfig:
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"gate must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            known = sorted(names)
            raise ConfigError(f"unknown config key(s): {', '.join('gate.' + k for k in unknown)}; known: {known}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad value in gate: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# which outputs may be compared


def scoring_settings(run_info: dict[str, Any]) -> dict[str, Any]:
    """What decides the figures of an output (from its ``run.json``): the face analyzer's settings (not its
    execution providers) and whether outputs were re-detected. ``stylid run`` and ``stylid score`` record both."""
    config = run_info.get("config") or {}
    faces = {k: v for k, v in (config.get("faces") or {}).items() if k != "providers"}
    return {"faces": faces, "redetect": (config.get("score") or {}).get("redetect")}


def check_comparable(candidate_info: dict[str, Any], baseline_info: dict[str, Any], baseline_uri: str) -> None:
    """``GateInputError`` unless both outputs were scored the same way: a baseline of another job kind, face
    backend or scoring config gives figures that differ for reasons other than the outputs."""
    job = baseline_info.get("job", "run")
    if job not in ("run", "score"):
        raise GateInputError(f"baseline {baseline_uri} is a 'stylid {job}' output; a baseline must be the output of"
                             " 'stylid score' or 'stylid run'")  # fmt: skip
    cv, bv = candidate_info.get("metrics_version", 1), baseline_info.get("metrics_version", 1)
    if cv != bv:
        raise GateInputError(
            f"baseline {baseline_uri} has metrics version {bv} and this run {cv}: the columns mean different things"
            " (version 2: style_distance is learned, the Lab figure is colour_distance); score the baseline again"
            " with this version or choose another baseline"
        )
    cand, base = scoring_settings(candidate_info), scoring_settings(baseline_info)
    cb, bb = cand["faces"].get("backend"), base["faces"].get("backend")
    if cb != bb:
        raise GateInputError(
            f"baseline {baseline_uri} was scored with face backend {bb!r} and this run with {cb!r}: identity"
            " similarities of different backends are not comparable; score the baseline again with this config or"
            " choose another baseline"
        )
    diffs = [
        f"faces.{k}: {base['faces'].get(k)!r} in the baseline, {cand['faces'].get(k)!r} here"
        for k in sorted(set(cand["faces"]) | set(base["faces"]))
        if cand["faces"].get(k) != base["faces"].get(k)
    ]
    if cand["redetect"] != base["redetect"]:
        diffs.append(f"score.redetect: {base['redetect']!r} in the baseline, {cand['redetect']!r} here")
    if diffs:
        raise GateInputError(
            f"baseline {baseline_uri} was scored with another config ({'; '.join(diffs)}): its figures are not"
            " comparable; score the baseline again with this config or choose another baseline"
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the comparison


def paired_interval(
    diffs: np.ndarray, confidence: float, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> tuple[float, float] | None:
    """The ``confidence`` Student-t interval of the mean of paired differences, clipped to ``bounds`` (the range
    the difference can take); ``None`` for fewer than two."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    mean = float(np.mean(diffs))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    return max(mean - half, bounds[0]), min(mean + half, bounds[1])


def paired_binary_interval(base: np.ndarray, cand: np.ndarray, confidence: float) -> tuple[float, float] | None:
    """The ``confidence`` interval of the difference of two matched proportions (candidate - baseline) by Agresti
    and Min (2005, Statistics in Medicine 24:729): the Wald interval after adding 1/2 to each cell of the 2x2
    table of pairs, clipped to [-1, 1]; ``None`` for fewer than two pairs. Unlike a t interval of the 0/1
    differences it never has zero width, and it covers near its nominal level even for a handful of pairs."""
    from scipy import stats

    b, c = np.asarray(base, bool), np.asarray(cand, bool)
    n = len(b)
    if n < 2:
        return None
    lost = float(np.sum(b & ~c)) + 0.5  # yes in the baseline, no now
    gained = float(np.sum(~b & c)) + 0.5
    total = n + 2.0
    p_lost, p_gained = lost / total, gained / total
    diff = p_gained - p_lost
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * math.sqrt(((p_lost + p_gained) - diff**2) / total)
    return max(diff - half, -1.0), min(diff + half, 1.0)


def _difference_bounds(figure: str) -> tuple[float, float]:
    low, high = FIGURE_RANGES[figure]
    return low - high, high - low


def _figure_check(
    bucket: str, figure: str, base: pd.Series, cand: pd.Series, n_faces: int, min_faces: int, config: GateConfig
) -> dict[str, Any]:
    _, _, higher_better, what = FIGURES[figure]
    keep = base.notna().to_numpy() & cand.notna().to_numpy()
    b = base[keep].astype(float).to_numpy()
    c = cand[keep].astype(float).to_numpy()
    limits: FigureGate = getattr(config, figure)
    row: dict[str, Any] = {
        "bucket": bucket, "figure": figure, "what": what, "higher_is_better": higher_better, "faces": n_faces,
        "pairs": int(len(b)), "baseline": None, "candidate": None, "diff": None, "ci_low": None, "ci_high": None,
        "drop": None, "rel_drop": None, "abs_threshold": limits.abs_drop, "rel_threshold": limits.rel_drop,
        "min_faces": min_faces, "breached": False, "significant": False, "status": "no_data", "passed": True,
    }  # fmt: skip
    if not len(b):
        return row
    diffs = c - b
    mean = float(np.mean(diffs))
    if figure in BINARY_FIGURES:
        ci = paired_binary_interval(b, c, config.confidence)
    else:
        ci = paired_interval(diffs, config.confidence, _difference_bounds(figure))
    drop = (-mean if higher_better else mean) + 0.0  # never -0.0
    base_mean = float(np.mean(b))
    rel = drop / abs(base_mean) if base_mean != 0 else (math.inf if drop > 0 else 0.0)
    breached = bool((limits.abs_drop is not None and drop > limits.abs_drop + 1e-12)
                    or (limits.rel_drop is not None and rel > limits.rel_drop + 1e-12))  # fmt: skip
    significant = ci is not None and (ci[1] < 0 if higher_better else ci[0] > 0)
    if n_faces < min_faces or ci is None:
        status = "too_few_faces"  # not gated: reported, never a pass
    elif breached and significant:
        status = "fail"
    elif breached:
        status = "noise"  # beyond the threshold, but the interval reaches zero
    else:
        status = "pass"
    row.update(baseline=base_mean, candidate=float(np.mean(c)), diff=mean + 0.0,
               ci_low=None if ci is None else ci[0], ci_high=None if ci is None else ci[1], drop=drop,
               rel_drop=rel, breached=breached, significant=bool(significant), status=status,
               passed=status != "fail")  # fmt: skip
    return row


FACE_KEY = ["image_id", "face_index"]
BOX = ["x0", "y0", "x1", "y1"]


def pair_faces(
    baseline_faces: pd.DataFrame, candidate_faces: pd.DataFrame, pair_iou: float
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Pair the faces of each image by geometry: the assignment of baseline to candidate boxes that maximises the
    total IoU (``scipy.optimize.linear_sum_assignment`` on 1 - IoU), keeping the pairs whose IoU is at least
    ``pair_iou``. ``face_index`` plays no part (it orders faces by size, so one lost face would shift every index
    of its image). Rows repeated with the same ``(image_id, face_index)`` (a shard written twice) count once.

    Returns the pairs (every column of both sides, suffixed ``_b`` and ``_c``, ``image_id`` shared), the baseline
    faces left unpaired (lost) and the candidate faces left unpaired (new)."""
    from scipy.optimize import linear_sum_assignment

    base = baseline_faces.drop_duplicates(FACE_KEY).reset_index(drop=True)
    cand = candidate_faces.drop_duplicates(FACE_KEY).reset_index(drop=True)
    base_rows: list[int] = []
    cand_rows: list[int] = []
    cand_groups = cand.groupby("image_id", sort=False).indices
    for image_id, b_idx in base.groupby("image_id", sort=True).indices.items():
        c_idx = cand_groups.get(image_id)
        if c_idx is None:
            continue
        overlap = pairwise_iou(base.loc[b_idx, BOX].to_numpy(float), cand.loc[c_idx, BOX].to_numpy(float))
        rows, cols = linear_sum_assignment(1.0 - overlap)
        keep = overlap[rows, cols] >= pair_iou
        base_rows += [int(b_idx[r]) for r in rows[keep]]
        cand_rows += [int(c_idx[c]) for c in cols[keep]]
    left = base.loc[base_rows].reset_index(drop=True).add_suffix("_b")
    right = cand.loc[cand_rows].reset_index(drop=True).add_suffix("_c")
    pairs = pd.concat([left, right], axis=1)
    pairs.insert(0, "image_id", left["image_id_b"] if len(left) else pd.Series(dtype=object))
    pairs = pairs.drop(columns=["image_id_b", "image_id_c"])
    lost = base.drop(index=base_rows).sort_values(FACE_KEY).reset_index(drop=True)
    new = cand.drop(index=cand_rows).sort_values(FACE_KEY).reset_index(drop=True)
    return pairs, lost, new


def median_night(
    nights: list[tuple[pd.DataFrame, pd.DataFrame]], pair_iou: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The median of several nights, as one night's ``(metrics, faces)`` to gate against (the drift base when no
    reference is pinned). ``nights``: ``(metrics, faces)`` each, the newest first; the newest is the anchor: its
    ids, statuses, faces and boxes are the median night's. Each figure of an anchor row is the median of that row's
    figure over the nights in which it was scored (status ``ok``; a face paired to the anchor's face by geometry,
    as ``pair_faces`` pairs two nights); for the yes/no figures the majority, a tie going to the anchor's value."""
    anchor_metrics, anchor_faces = nights[0]
    metrics = anchor_metrics.drop_duplicates("image_id").reset_index(drop=True)
    faces = anchor_faces.drop_duplicates(FACE_KEY).reset_index(drop=True)
    ok_ids = set(metrics.loc[metrics["status"] == "ok", "image_id"])
    faces = faces[faces["image_id"].isin(ok_ids)].reset_index(drop=True)
    image_columns = [c for t, c, _, _ in FIGURES.values() if t == "metrics" and c in metrics]
    face_columns = [c for t, c, _, _ in FIGURES.values() if t == "faces" and c in faces]
    image_values = [metrics.loc[metrics["status"] == "ok", ["image_id", *image_columns]]]
    face_values = [faces[FACE_KEY + face_columns]]
    for night_metrics, night_faces in nights[1:]:
        night_metrics = night_metrics.drop_duplicates("image_id")
        ok = night_metrics[(night_metrics["status"] == "ok") & night_metrics["image_id"].isin(ok_ids)]
        image_values.append(ok.reindex(columns=["image_id", *image_columns]))
        pairs, _, _ = pair_faces(faces, night_faces[night_faces["image_id"].isin(set(ok["image_id"]))], pair_iou)
        paired = pairs.rename(columns={"face_index_b": "face_index"})
        face_values.append(paired.reindex(columns=["image_id", "face_index", *(f"{c}_c" for c in face_columns)])
                           .set_axis(FACE_KEY + face_columns, axis=1))  # fmt: skip

    def medians(parts: list[pd.DataFrame], key: list[str], columns: list[str]) -> pd.DataFrame:
        long = pd.concat(parts, ignore_index=True)
        out = {}
        for c in columns:
            values = long[[*key, c]].dropna(subset=[c])
            if c in BINARY_FIGURES:
                share = values.assign(v=values[c].astype(float)).groupby(key)["v"].mean()
                out[c] = share.map(lambda s: None if s == 0.5 else bool(s > 0.5)).astype(object)
            else:
                out[c] = values.assign(v=values[c].astype(float)).groupby(key)["v"].median()
        return pd.DataFrame(out)

    def replace(frame: pd.DataFrame, key: list[str], values: pd.DataFrame) -> pd.DataFrame:
        indexed = frame.set_index(key)
        for c in values.columns:
            new = values[c].reindex(indexed.index)
            if c in BINARY_FIGURES:  # a tie keeps the anchor's value
                new = new.where(new.notna(), indexed[c]).astype(object)
            indexed[c] = new
        return indexed.reset_index()

    metrics = replace(metrics, ["image_id"], medians(image_values, ["image_id"], image_columns))
    faces = replace(faces, FACE_KEY, medians(face_values, FACE_KEY, face_columns))
    return metrics, faces


def _in_bucket(frame: pd.DataFrame, column: str, bucket: str) -> int:
    if bucket == "all":
        return int(len(frame))
    return int((frame[column] == bucket).sum()) if column in frame else 0


def _pairing_by_bucket(pairs: pd.DataFrame, lost: pd.DataFrame, new: pd.DataFrame) -> list[dict[str, Any]]:
    """Paired, lost (baseline faces without a partner, in their baseline bucket) and new (candidate faces without
    one, in their candidate bucket) faces per size bucket and in ``all``."""
    rows = []
    for bucket in [*(name for name, _ in SIZE_BUCKETS), "all"]:
        row = {
            "bucket": bucket,
            "paired": _in_bucket(pairs, "size_bucket_b", bucket),
            "lost": _in_bucket(lost, "size_bucket", bucket),
            "new": _in_bucket(new, "size_bucket", bucket),
        }
        if bucket == "all" or row["paired"] or row["lost"] or row["new"]:
            rows.append(row)
    return rows


def _unpaired_check(pairing: list[dict[str, Any]], max_share: float | None, max_count: int | None) -> dict[str, Any]:
    """The faces left without a partner, from ``_pairing_by_bucket``'s rows: their share of all faces, (lost + new)
    / (paired + lost + new), against ``max_share`` over all faces *and in each size bucket*, and their count
    against ``max_count``. Per bucket, because one share over all faces lets a small bucket lose faces unseen: one
    lost face of a 54-face canary is 1.9% of all faces, but 1 of the 7 faces of its bucket."""

    def share_of(row: dict[str, Any]) -> dict[str, Any]:
        faces = row["paired"] + row["lost"] + row["new"]
        share = (row["lost"] + row["new"]) / faces if faces else 0.0
        return {"count": row["lost"] + row["new"], "lost": row["lost"], "new": row["new"], "faces": faces,
                "share": share, "passed": max_share is None or share <= max_share + 1e-12}  # fmt: skip

    total = share_of(next(r for r in pairing if r["bucket"] == "all"))
    buckets = [{"bucket": r["bucket"], **share_of(r)} for r in pairing if r["bucket"] != "all"]
    count_ok = max_count is None or total["count"] <= max_count
    return {"check": "unpaired_faces", **total, "max": max_share, "max_count": max_count,
            "share_passed": total["passed"], "count_passed": count_ok, "buckets": buckets,
            "passed": total["passed"] and count_ok and all(b["passed"] for b in buckets)}  # fmt: skip


def fold_small_buckets(
    sizes: list[tuple[str, int]], min_faces: int
) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """Buckets with fewer than ``min_faces`` faces are not gated alone: each run of them, smallest first, is folded
    into the next larger bucket(s) until the fold has ``min_faces`` faces; a fold that never gets there is left to
    ``all``. ``sizes``: (bucket, paired faces), smallest bucket first. Returns the folds to gate, as (name, e.g.
    ``"<32+32-48"``, member buckets), and each small bucket -> the name of what gates it."""
    folds: list[tuple[str, list[str]]] = []
    gated_in: dict[str, str] = {}
    pending: list[str] = []
    n_pending = 0
    for bucket, n in sizes:
        if not pending and n >= min_faces:
            continue
        pending.append(bucket)
        n_pending += n
        if len(pending) > 1 and n_pending >= min_faces:
            name = "+".join(pending)
            folds.append((name, list(pending)))
            gated_in.update({b: name for b in pending if dict(sizes)[b] < min_faces})
            pending, n_pending = [], 0
    gated_in.update({b: "all" for b in pending})
    return folds, gated_in


def canary_warning(buckets: list[dict[str, Any]], config: GateConfig, source: str) -> str | None:
    """The warning ``stylid score`` prints before scoring when the canary cannot gate a size bucket alone: from
    ``buckets`` (a ``run.json`` summary's ``buckets``: ``size_bucket``, ``faces``) of ``source`` (the baseline),
    the buckets with fewer than ``min_faces`` faces and where each is gated instead (``fold_small_buckets``), and
    whether even ``all`` is short of ``min_faces_all``; ``None`` when every bucket can be gated. Paired faces can
    only be fewer than a baseline's faces, so a bucket named here will not be gated alone tonight either."""
    order = [name for name, _ in SIZE_BUCKETS]
    sizes = sorted(((str(b.get("size_bucket")), int(b.get("faces") or 0)) for b in buckets if b.get("faces")),
                   key=lambda s: order.index(s[0]) if s[0] in order else len(order))  # fmt: skip
    small = [(b, n) for b, n in sizes if n < config.min_faces]
    total = sum(n for _, n in sizes)
    if not small and total >= config.min_faces_all:
        return None
    _, gated_in = fold_small_buckets(sizes, config.min_faces)
    targets = list(dict.fromkeys(gated_in.get(b, "all") for b, _ in small))
    parts = ["; ".join(", ".join(f"{b} ({n} face{'' if n == 1 else 's'})" for b, n in small
                                 if gated_in.get(b, "all") == t) + f" gated in {t}" for t in targets)]  # fmt: skip
    message = (
        f"warning: {source} has fewer than gate.min_faces ({config.min_faces}) faces in {', '.join(parts)}: a drop"
        " there cannot fail on its own (a canary needs gate.min_faces faces in every bucket)"
    )
    if total < config.min_faces_all:
        message += (f"; and {total} faces in all, under gate.min_faces_all ({config.min_faces_all}): nothing can be"
                    " gated (exit 3)")  # fmt: skip
    return message


def _count_check(name: str, ids: list, limit: int | None) -> dict[str, Any]:
    return {"check": name, "count": len(ids), "max": limit, "passed": limit is None or len(ids) <= limit}


def compare_runs(
    candidate_metrics: pd.DataFrame,
    candidate_faces: pd.DataFrame,
    baseline_metrics: pd.DataFrame,
    baseline_faces: pd.DataFrame,
    config: GateConfig,
) -> dict[str, Any]:
    """The gate's verdict and every figure behind it, as a JSON-ready dict (``gate.json``).

    ``*_metrics``: ``image_id``, ``status`` and the per-image figures; ``*_faces``: the per-face rows of the
    ``faces/`` shards. Raises ``GateInputError`` when no id is shared.
    """
    cm = candidate_metrics.drop_duplicates("image_id").set_index("image_id")
    bm = baseline_metrics.drop_duplicates("image_id").set_index("image_id")
    only_base = [str(i) for i in bm.index.difference(cm.index).sort_values()]
    only_cand = [str(i) for i in cm.index.difference(bm.index).sort_values()]
    shared = bm.index.intersection(cm.index).sort_values()
    if not len(shared):
        raise GateInputError(
            f"the candidate ({len(cm)} ids) and the baseline ({len(bm)} ids) share no image_id: nothing to compare"
            " (a regression gate needs the same inputs scored twice, e.g. a fixed canary set)"
        )
    base_status, cand_status = bm.loc[shared, "status"], cm.loc[shared, "status"]
    worse_ids = base_status.index[(base_status == "ok") & (cand_status != "ok")]
    errors = cm["error"] if "error" in cm else pd.Series(None, index=cm.index, dtype=object)
    worse = [{"image_id": i, "baseline": "ok", "candidate": cand_status[i],
              "error": errors[i] if isinstance(errors[i], str) else None} for i in worse_ids]  # fmt: skip
    both_ok = list(base_status.index[(base_status == "ok") & (cand_status == "ok")])

    bf = baseline_faces[baseline_faces["image_id"].isin(both_ok)]
    cf = candidate_faces[candidate_faces["image_id"].isin(both_ok)]
    pairs, lost, new = pair_faces(bf, cf, config.pair_iou)
    unpaired_base = lost[FACE_KEY].to_numpy().tolist()
    unpaired_cand = new[FACE_KEY].to_numpy().tolist()

    images = cm.loc[both_ok].add_suffix("_c").join(bm.loc[both_ok].add_suffix("_b"))
    order = [name for name, _ in SIZE_BUCKETS]
    sizes = {b: int((pairs["size_bucket_b"] == b).sum()) if len(pairs) else 0 for b in order}
    present = [b for b in order if sizes[b]]
    groups, gated_in = fold_small_buckets([(b, sizes[b]) for b in present], config.min_faces)
    checks = []
    for bucket, members in [*((b, [b]) for b in present), *groups, ("all", order)]:
        sub = pairs[pairs["size_bucket_b"].isin(members)] if len(pairs) else pairs
        in_bucket = both_ok if bucket == "all" else list(pd.unique(sub["image_id"]))
        min_faces = config.min_faces_all if bucket == "all" else config.min_faces
        for figure, (table, column, _, _) in FIGURES.items():
            frame = sub if table == "faces" else images.loc[in_bucket]
            none = pd.Series(None, index=frame.index, dtype=object)  # a column an output lacks is null
            base, cand = frame.get(f"{column}_b", none), frame.get(f"{column}_c", none)
            checks.append(_figure_check(bucket, figure, base.reset_index(drop=True), cand.reset_index(drop=True),
                                        int(len(sub)), min_faces, config))  # fmt: skip
    for check in checks:
        check["gated_in"] = gated_in.get(check["bucket"], check["bucket"])
    any_gated = any(c["status"] not in ("too_few_faces", "no_data") for c in checks)
    counts = [
        _count_check("status_worse", worse, config.max_status_worse),
        _count_check("only_in_baseline", only_base, config.max_only_in_baseline),
        _count_check("only_in_candidate", only_cand, config.max_only_in_candidate),
    ]
    face_pairing = _pairing_by_bucket(pairs, lost, new)
    unpaired = _unpaired_check(face_pairing, config.max_unpaired_share, config.max_unpaired_faces)
    failures = [_describe(c, config) for c in checks if not c["passed"]]
    failures += [f"{c['check']}: {c['count']} (at most {c['max']})" for c in counts if not c["passed"]]
    if not unpaired["share_passed"]:
        failures.append(
            f"unpaired faces: {unpaired['count']} of {unpaired['faces']} ({unpaired['lost']} lost,"
            f" {unpaired['new']} new; {unpaired['share']:.1%}, at most {unpaired['max']:.1%})"
        )
    failures += [f"unpaired faces in bucket {b['bucket']}: {b['count']} of {b['faces']} ({b['lost']} lost, {b['new']}"
                 f" new; {b['share']:.1%}, at most {unpaired['max']:.1%} in each bucket)"
                 for b in unpaired["buckets"] if not b["passed"]]  # fmt: skip
    if not unpaired["count_passed"]:
        failures.append(f"unpaired faces: {unpaired['count']} (at most {unpaired['max_count']})")
    return {
        "passed": not failures,
        "gated": any_gated,  # false: no figure had faces enough to be gated (stylid score exits 3 unless it failed)
        "not_gated_alone": gated_in,  # size bucket under min_faces -> the folded bucket (or `all`) that gates it
        "failures": failures,
        "interval": f"{INTERVAL_METHOD}, {config.confidence:.0%}",
        "thresholds": config.to_dict(),
        "shared_ids": len(shared),
        "scored_in_both": len(both_ok),
        "faces_paired": int(len(pairs)),
        "faces_unpaired_baseline": [[str(i), int(k)] for i, k in unpaired_base],
        "faces_unpaired_candidate": [[str(i), int(k)] for i, k in unpaired_cand],
        "unpaired_faces": unpaired,
        "face_pairing": face_pairing,
        "only_in_baseline": only_base,
        "only_in_candidate": only_cand,
        "status_worse": worse,
        "counts": counts,
        "checks": checks,
    }


def _describe(c: dict[str, Any], config: GateConfig) -> str:
    limits = " or ".join(
        ([f"{c['abs_threshold']:g}"] if c["abs_threshold"] is not None else [])
        + ([f"{c['rel_threshold']:.0%} of the baseline"] if c["rel_threshold"] is not None else [])
    )
    return (
        f"bucket {c['bucket']}: {c['figure']} ({c['what']}) worsened by {c['drop']:.4f} ({c['rel_drop']:.1%}):"
        f" {c['baseline']:.4f} -> {c['candidate']:.4f} over {c['pairs']} pairs, {config.confidence:.0%} interval of"
        f" the difference [{c['ci_low']:.4f}, {c['ci_high']:.4f}]; allowed {limits}"
    )


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_gate(result: dict[str, Any]) -> str:
    """The gate as a readable table (what ``stylid score --baseline`` prints)."""
    lines = [
        f"gate: {'PASS' if result['passed'] else 'FAIL'}  (shared ids {result['shared_ids']}, scored in both"
        f" {result['scored_in_both']}, faces paired {result['faces_paired']}; {result['interval']})",
        f"{'bucket':>13} {'figure':>15} {'faces':>5} {'pairs':>5} {'baseline':>9} {'candidate':>9} {'diff':>8}"
        f" {'interval':>19} {'drop':>7} {'allowed':>13} {'verdict':>13}",
    ]
    for c in result["checks"]:
        interval = f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]" if c["ci_low"] is not None else "-"
        allowed = "/".join([_num(c["abs_threshold"], "g"), "-" if c["rel_threshold"] is None
                            else f"{c['rel_threshold']:.0%}"])  # fmt: skip
        verdict = {"fail": "FAIL", "noise": "noise (pass)", "too_few_faces": "few faces", "no_data": "no data"}.get(
            c["status"], "pass"
        )
        lines.append(
            f"{c['bucket']:>13} {c['figure']:>15} {c['faces']:>5} {c['pairs']:>5} {_num(c['baseline']):>9}"
            f" {_num(c['candidate']):>9} {_num(c['diff'], '+.3f'):>8} {interval:>19} {_num(c['drop'], '+.3f'):>7}"
            f" {allowed:>13} {verdict:>13}"
        )
    for c in result["counts"]:
        ids = {"status_worse": [w["image_id"] for w in result["status_worse"]],
               "only_in_baseline": result["only_in_baseline"],
               "only_in_candidate": result["only_in_candidate"]}[c["check"]]  # fmt: skip
        shown = ", ".join(map(str, ids[:10])) + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
        lines.append(f"{c['check']}: {c['count']} (max {c['max'] if c['max'] is not None else '-'})"
                     f" {'ok' if c['passed'] else 'FAIL'}" + (f": {shown}" if ids else ""))  # fmt: skip
    u = result["unpaired_faces"]
    count_max = "" if u.get("max_count") is None else f", at most {u['max_count']} faces"
    lines.append(
        f"unpaired faces: {u['count']} of {u['faces']} ({u['lost']} lost, {u['new']} new; {u['share']:.1%},"
        f" max {'-' if u['max'] is None else format(u['max'], '.1%')} over all and in each bucket{count_max})"
        f" {'ok' if u['passed'] else 'FAIL'}"
    )
    if u["count"]:
        lines.append("  per bucket: " + ", ".join(
            f"{b['bucket']} {b['count']} of {b['faces']} ({b['lost']} lost, {b['new']} new; {b['share']:.1%})"
            + ("" if b["passed"] else " FAIL") for b in u.get("buckets", []) if b["count"]))  # fmt: skip
    if result["not_gated_alone"]:
        lines.append("not gated alone (fewer than min_faces paired faces): " + ", ".join(
            f"{b} (in {into})" for b, into in result["not_gated_alone"].items()))  # fmt: skip
    if not result["gated"]:
        t = result["thresholds"]
        lines.append(f"NOT GATED: no bucket had min_faces ({t['min_faces']}) paired faces, nor `all` min_faces_all"
                     f" ({t['min_faces_all']}): no figure could be gated")  # fmt: skip
    for f in result["failures"]:
        lines.append(f"FAIL {f}")
    return "\n".join(lines)

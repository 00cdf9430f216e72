"""``report.html``: identity similarity versus face size, status counts and a before/after thumbnail grid.

Self-contained HTML (plots and thumbnails inlined as base64), written through fsspec next to the run's outputs. The
page is a Jinja2 template (``stylid_core/templates/``, package data) with autoescaping on: ids, URIs and errors are
escaped wherever they appear; only what this package rendered itself (``markupsafe.Markup``) goes in as HTML.
"""

from __future__ import annotations

import base64
import bisect
import functools
import io
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stylid_core.faces.base import SIZE_BUCKETS
from stylid_core.imageio import decode_image, encode_jpeg
from stylid_core.ledger import FACES, METRICS, iter_shards, live_shards
from stylid_core.storage import join, read_bytes, write_bytes

#: the page's body width (px): every image the report embeds is at most this wide
BODY_PX = 1200
FIGURE_DPI = 110


def _png_of_figure(fig) -> str:
    """The figure as a base64 PNG, cropped to what it draws (``bbox_inches="tight"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def cell(v: Any, digits: int = 3) -> str:
    """A value as a report shows it: floats to ``digits`` places, a missing value (None, NaN) as "–"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "\u2013"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    return str(v)


@functools.cache
def _templates():
    """The Jinja2 environment of the report templates (package data), autoescaping every value."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("stylid_core", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = cell
    return env


def render_template(name: str, **context: Any):
    """``stylid_core/templates/<name>`` rendered with ``context``, as ``markupsafe.Markup`` (safe to nest in another
    template: what it holds was escaped when it was rendered)."""
    from markupsafe import Markup

    return Markup(_templates().get_template(name).render(**context))


#: the per-face columns averaged per size bucket (booleans as rates)
BUCKET_MEANS = (
    "id_sim",
    "id_sim_no_mosaic",
    "id_match",
    "id_match_no_mosaic",
    "redetected",
    "photo_detail_fine",
    "photo_detail_mid",
    "photo_detail_fine_no_mosaic",
    "photo_detail_mid_no_mosaic",
)
#: the columns a summary reads: a projected scan, never whole shards
SUMMARY_METRICS_COLUMNS = ["status", "engine", "model", "style_distance", "colour_distance", "content_ssim"]
SUMMARY_FACES_COLUMNS = ["size_bucket", "in_mosaic", *BUCKET_MEANS]


def _as_table(data: pd.DataFrame | pa.Table | pa.RecordBatch) -> pa.Table:
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    return pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data


def _sum_count(table: pa.Table, column: str) -> tuple[float, int]:
    """Sum and count of the non-null values (booleans as 0/1) of ``column``; (0, 0) where it is absent."""
    if column not in table.column_names:
        return 0.0, 0
    values = table.column(column).cast(pa.float64())
    total = pc.sum(values).as_py()
    return float(total or 0.0), int(pc.count(values).as_py())


def identity_recovered(id_sim: float | None, id_sim_no_mosaic: float | None) -> float | None:
    """The share of the identity that plain stylization loses which the run keeps: (id_sim - plain) / (1 - plain),
    similarities to the source face (1.0 is the source itself); None without both, or when plain lost nothing."""
    if id_sim is None or id_sim_no_mosaic is None or 1.0 - id_sim_no_mosaic < 1e-6:
        return None
    return (id_sim - id_sim_no_mosaic) / (1.0 - id_sim_no_mosaic)


class SummaryAccumulator:
    """The summary of an output, built shard by shard (bounded memory, any number of rows).

    ``add_metrics``/``add_faces`` take tables (or frames) holding at least ``SUMMARY_METRICS_COLUMNS`` /
    ``SUMMARY_FACES_COLUMNS`` where present; ``result()`` gives what ``summarize`` returns. Means skip nulls.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.status: Counter[str] = Counter()
        self.engines: set[str] = set()
        self.ok_sums = {c: [0.0, 0] for c in ("style_distance", "colour_distance", "content_ssim")}
        self.faces = 0
        self.face_sums = {c: [0.0, 0] for c in ("id_sim", "id_sim_no_mosaic")}
        self.buckets: dict[str, dict[str, list[float]]] = {}

    def add_metrics(self, data: pd.DataFrame | pa.Table | pa.RecordBatch) -> None:
        table = _as_table(data)
        if not table.num_rows:
            return
        self.rows += table.num_rows
        counts = pc.value_counts(table.column("status"))
        for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            self.status[str(v)] += int(n)
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        if ok.num_rows and {"engine", "model"} <= set(ok.column_names):
            pairs = ok.group_by(["engine", "model"]).aggregate([])
            self.engines |= {str(e) if m is None else f"{e} ({m})"
                             for e, m in zip(pairs["engine"].to_pylist(), pairs["model"].to_pylist())}  # fmt: skip
        for c, acc in self.ok_sums.items():
            total, n = _sum_count(ok, c)
            acc[0] += total
            acc[1] += n

    def add_faces(self, data: pd.DataFrame | pa.Table | pa.RecordBatch) -> None:
        table = _as_table(data)
        if not table.num_rows:
            return
        self.faces += table.num_rows
        for c, acc in self.face_sums.items():
            total, n = _sum_count(table, c)
            acc[0] += total
            acc[1] += n
        buckets = table.column("size_bucket").cast(pa.string()).combine_chunks()
        for bucket in pc.unique(buckets).to_pylist():
            part = table.filter(pc.equal(buckets, bucket)) if bucket is not None else table.filter(pc.is_null(buckets))
            acc = self.buckets.setdefault(str(bucket), {c: [0.0, 0] for c in ("faces", "in_mosaic", *BUCKET_MEANS)})
            acc["faces"][0] += part.num_rows
            for c in ("in_mosaic", *BUCKET_MEANS):
                total, n = _sum_count(part, c)
                acc[c][0] += total
                acc[c][1] += n

    def bucket_records(self) -> list[dict[str, Any]]:
        """One record per size bucket present, in ``SIZE_BUCKETS`` order."""
        order = [name for name, _ in SIZE_BUCKETS]
        records = []
        for bucket in sorted(self.buckets, key=lambda b: order.index(b) if b in order else len(order)):
            acc = self.buckets[bucket]
            # in_mosaic: null where no face row says (a scored output: only the run that made it knows)
            rec: dict[str, Any] = {"size_bucket": bucket, "faces": int(acc["faces"][0]),
                                   "in_mosaic": int(acc["in_mosaic"][0]) if acc["in_mosaic"][1] else None}  # fmt: skip
            for c in BUCKET_MEANS:
                rec[c] = acc[c][0] / acc[c][1] if acc[c][1] else None
            rec["id_recovered"] = identity_recovered(rec["id_sim"], rec["id_sim_no_mosaic"])
            records.append(rec)
        return records

    def result(self) -> dict[str, Any]:
        mean = lambda acc: acc[0] / acc[1] if acc[1] else None  # noqa: E731
        return {
            "rows": self.rows,
            "status_counts": dict(self.status),
            "faces": self.faces,
            "engines": sorted(self.engines),
            "id_sim_mean": mean(self.face_sums["id_sim"]),
            "id_sim_mean_no_mosaic": mean(self.face_sums["id_sim_no_mosaic"]),
            "style_distance_mean": mean(self.ok_sums["style_distance"]),
            "colour_distance_mean": mean(self.ok_sums["colour_distance"]),
            "content_ssim_mean": mean(self.ok_sums["content_ssim"]),
            "buckets": self.bucket_records(),
        }


def bucket_table(faces: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Per size bucket: faces, mean identity similarity with and without mosaic, match rates, re-detection."""
    acc = SummaryAccumulator()
    acc.add_faces(faces)
    records = acc.bucket_records()
    return pd.DataFrame(records) if records else pd.DataFrame(columns=["size_bucket", "faces"])


def summarize(metrics: pd.DataFrame | pa.Table, faces: pd.DataFrame | pa.Table) -> dict[str, Any]:
    """Counts and means of a whole output held in memory: rows by status, faces by bucket, identity by bucket."""
    acc = SummaryAccumulator()
    acc.add_metrics(metrics)
    acc.add_faces(faces)
    return acc.result()


def summarize_output(output_uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """``summarize`` of an output's ledger from a projected scan of its live shards, one shard at a time."""
    names = live_shards(output_uri, storage_options)
    acc = SummaryAccumulator()
    for table in iter_shards(output_uri, METRICS, storage_options, SUMMARY_METRICS_COLUMNS, names):
        acc.add_metrics(table)
    for table in iter_shards(output_uri, FACES, storage_options, SUMMARY_FACES_COLUMNS, names):
        acc.add_faces(table)
    return acc.result()


def sample_ok_rows(output_uri: str, storage_options: dict | None, k: int) -> pd.DataFrame:
    """The ``k`` ok rows with the smallest ids (all metrics columns): the report's before/after grid.

    One projected scan of ids and statuses keeps a running top ``k``; then only the shards holding those rows
    are read whole."""
    names = live_shards(output_uri, storage_options)
    best = pa.table({"image_id": pa.array([], pa.string()), "shard": pa.array([], pa.string())})
    for name, table in zip(names, iter_shards(output_uri, METRICS, storage_options, ["image_id", "status"], names)):
        ok = table.filter(pc.equal(table.column("status"), "ok")).select(["image_id"])
        ok = ok.cast(pa.schema([("image_id", pa.string())]))
        ok = ok.append_column("shard", pa.array([name] * ok.num_rows, pa.string()))
        best = pa.concat_tables([best, ok])
        if best.num_rows > k:
            best = best.take(pc.select_k_unstable(best, k, [("image_id", "ascending")]))
    if not best.num_rows or k <= 0:
        return pd.DataFrame()
    wanted = set(best.column("image_id").to_pylist())
    shards = sorted(set(best.column("shard").to_pylist()))
    parts = [t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(sorted(wanted))))
             for t in iter_shards(output_uri, METRICS, storage_options, None, shards)]  # fmt: skip
    rows = pa.concat_tables(parts, promote_options="permissive").to_pandas()
    return rows.sort_values("image_id").reset_index(drop=True)


#: the face columns the report's scatter reads (not the zoomed strips: a few kB each)
SCATTER_FACES_COLUMNS = ["image_id", "face_index", "size_px", "in_mosaic", "id_sim", "id_sim_no_mosaic"]
#: the face columns of the zoomed strips section
STRIP_FACES_COLUMNS = ["image_id", "face_index", "size_px", "id_dist", "id_dist_no_mosaic", "zoom_strip"]


def sample_faces(output_uri: str, storage_options: dict | None, k: int) -> pd.DataFrame:
    """Up to ``k`` face rows (``SCATTER_FACES_COLUMNS``) for the report's scatter plot, read shard by shard in
    name order (names hash the ids, so the first shards are a spread sample) until ``k`` are in."""
    parts, n = [], 0
    for table in iter_shards(output_uri, FACES, storage_options, SCATTER_FACES_COLUMNS, threads=4):
        parts.append(table.slice(0, k - n))
        n += parts[-1].num_rows
        if n >= k:
            break
    return pa.concat_tables(parts, promote_options="permissive").to_pandas() if parts else pd.DataFrame()


def format_summary(summary: dict[str, Any]) -> str:
    """The closing summary printed by ``stylid run``."""
    lines = [f"rows: {summary['rows']}  " + "  ".join(f"{k}={v}" for k, v in sorted(summary["status_counts"].items()))]
    lines.append(f"engine: {', '.join(summary['engines']) or '(none ran)'}")
    lines.append(f"faces scored: {summary['faces']}")
    if summary.get("style_distance_mean") is not None:
        lines.append(f"style distance (learned, lower is nearer the painting): {summary['style_distance_mean']:.3f}")
    if summary["buckets"]:
        lines.append(
            f"{'bucket':>8} {'faces':>6} {'mosaic':>7} {'id_sim':>7} {'no_mosaic':>9} {'recov':>6} {'match':>6}"
            f" {'redet':>6} {'detail fine/mid (photo 1.00)':>29}"
        )
        for b in summary["buckets"]:
            detail = f"{_fmt(b.get('photo_detail_fine'))}/{_fmt(b.get('photo_detail_mid'))}"
            lines.append(
                f"{b['size_bucket']:>8} {b['faces']:>6} {_count(b['in_mosaic']):>7} {_fmt(b['id_sim'], 3):>7} "
                f"{_fmt(b['id_sim_no_mosaic'], 3):>9} {_fmt(b.get('id_recovered')):>6} {_fmt(b['id_match']):>6}"
                f" {_fmt(b['redetected']):>6} {detail:>29}"
            )
    return "\n".join(lines)


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _count(v: int | None) -> str:
    return "n/a" if v is None else str(v)


def _thumb(uri: str, storage_options: dict | None, side: int = 220) -> str | None:
    try:
        image = decode_image(read_bytes(uri, storage_options))
    except Exception:
        return None
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        import cv2

        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return base64.b64encode(encode_jpeg(image, 80)).decode()


#: faces under this size (px) get a zoomed strip (source crop, without mosaic, with mosaic) in their face row
ZOOM_FACE_PX = 48
ZOOM_SIDE = 96  # px of each panel of a strip
#: the report shows the strips of this many smallest faces; a scoring stage encodes a strip only for a face that
#: can be among them (``SmallestFaces``), not for every small face
ZOOM_MAX_FACES = 16


class SmallestFaces:
    """The ``capacity`` smallest faces under ``ZOOM_FACE_PX`` that one stage instance has admitted, in the report's
    order (``size_px``, ``image_id``, ``face_index``): which faces get a zoomed strip.

    ``admit`` is true for a face that is, when it is seen, among the ``capacity`` smallest this instance has seen.
    Every face of the whole output's ``capacity`` smallest is also among the smallest its own instance had seen at
    the time (fewer than ``capacity`` faces anywhere precede it), so it carries a strip, whatever the number of
    actors, batches, reruns or restarts; the report keeps the smallest of the faces with a strip
    (``smallest_face_strips``). Rows arrive in no particular size order, so an instance encodes about
    ``capacity * ln(faces / capacity)`` strips, not one per small face (a few hundred per million faces).
    """

    def __init__(self, capacity: int = ZOOM_MAX_FACES) -> None:
        self.capacity = capacity
        self._kept: list[tuple[float, str, int]] = []  # sorted; at most ``capacity``

    def _key(self, size_px: float, image_id: str, face_index: int) -> tuple[float, str, int] | None:
        """The face's place in the order (smaller first), None where it is not a candidate."""
        return (float(size_px), str(image_id), int(face_index)) if size_px < ZOOM_FACE_PX else None

    def admit(self, size_px: float, image_id: str, face_index: int) -> bool:
        """Whether this face gets a strip (and, if so, it is counted among the kept ones from now on)."""
        key = self._key(size_px, image_id, face_index)
        if key is None or self.capacity <= 0:
            return False
        if len(self._kept) >= self.capacity and key >= self._kept[-1]:
            return key in self._kept
        if key not in self._kept:
            bisect.insort(self._kept, key)
            del self._kept[self.capacity :]
        return True


class LargestFaces(SmallestFaces):
    """``SmallestFaces`` for the other end: the ``capacity`` largest faces of at least ``ZOOM_FACE_PX``, so the
    report shows what the run does to the faces the mosaic does not touch, beside the small ones."""

    def _key(self, size_px: float, image_id: str, face_index: int) -> tuple[float, str, int] | None:
        return (-float(size_px), str(image_id), int(face_index)) if size_px >= ZOOM_FACE_PX else None


def zoom_strip(face_box: tuple[float, float, float, float], *images: np.ndarray | None) -> str:
    """A base64 JPEG of the face's square neighbourhood (the box grown by half its size per side) cut from each of
    ``images`` (e.g. source, stylized without mosaic, stylized with mosaic; ``None`` panels are skipped), each
    scaled to ``ZOOM_SIDE`` px and put side by side: a 24 px face shows nothing in a whole-image thumbnail."""
    import cv2

    x0, y0, x1, y1 = face_box
    side = 2.0 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    panels = []
    for image in images:
        if image is None:
            continue
        h, w = image.shape[:2]
        a0, b0 = int(max(0, np.floor(cx - side / 2))), int(max(0, np.floor(cy - side / 2)))
        a1, b1 = int(min(w, np.ceil(cx + side / 2))), int(min(h, np.ceil(cy + side / 2)))
        crop = np.ascontiguousarray(image[b0:b1, a0:a1])
        panels.append(cv2.resize(crop, (ZOOM_SIDE, ZOOM_SIDE), interpolation=cv2.INTER_CUBIC))
    return base64.b64encode(encode_jpeg(np.concatenate(panels, axis=1), 85)).decode()


def small_faces_html(faces: pd.DataFrame, max_faces: int = ZOOM_MAX_FACES, largest: bool = False) -> str:
    """The report section of zoomed strips of the smallest faces (from the face rows' ``zoom_strip``), or with
    ``largest`` of the largest ones (of at least ``ZOOM_FACE_PX``)."""
    if faces.empty or "zoom_strip" not in faces:
        return ""
    rows = faces[faces["zoom_strip"].map(lambda v: isinstance(v, str) and len(v) > 0)]
    rows = rows[rows["size_px"] >= ZOOM_FACE_PX] if largest else rows[rows["size_px"] < ZOOM_FACE_PX]
    if rows.empty:
        return ""
    rows = rows.assign(_order=-rows["size_px"] if largest else rows["size_px"])
    rows = rows.sort_values(["_order", "image_id", "face_index"]).head(max_faces)
    strips = [{"strip": r["zoom_strip"], "image_id": str(r["image_id"]), "face_index": int(r["face_index"]),
               "size_px": float(r["size_px"]), "id_dist": r.get("id_dist"),
               "id_dist_no_mosaic": r.get("id_dist_no_mosaic")} for _, r in rows.iterrows()]  # fmt: skip
    title = "Largest faces, zoomed" if largest else "Smallest faces, zoomed"
    return render_template("face_strips.html.j2", title=title, strips=strips)


def face_strips(output_uri: str, storage_options: dict | None, k: int = ZOOM_MAX_FACES) -> pd.DataFrame:
    """The strips of the report: the ``k`` smallest and the ``k`` largest faces that carry one."""
    small = smallest_face_strips(output_uri, storage_options, k)
    large = smallest_face_strips(output_uri, storage_options, k, largest=True)
    return pd.concat([small, large], ignore_index=True) if len(large) else small


def smallest_face_strips(
    output_uri: str, storage_options: dict | None, k: int = ZOOM_MAX_FACES, largest: bool = False
) -> pd.DataFrame:
    """The ``k`` smallest faces of the output that carry a zoomed strip (``STRIP_FACES_COLUMNS``), in the report's
    order: one projected scan of the live faces shards, the strips' nulls filtered out shard by shard (the scoring
    stages encode few strips: ``SmallestFaces``), a running top ``k``."""
    best: pa.Table | None = None
    order = [("size_px", "descending" if largest else "ascending"), ("image_id", "ascending"),
             ("face_index", "ascending")]  # fmt: skip
    for table in iter_shards(output_uri, FACES, storage_options, STRIP_FACES_COLUMNS, threads=4):
        if "zoom_strip" not in table.column_names:
            continue
        table = table.filter(pc.is_valid(table.column("zoom_strip")))
        size = table.column("size_px")
        table = table.filter(pc.greater_equal(size, ZOOM_FACE_PX) if largest else pc.less(size, ZOOM_FACE_PX))
        best = table if best is None else pa.concat_tables([best, table], promote_options="permissive")
        if best.num_rows > k:
            best = best.take(pc.select_k_unstable(best, k, order))
    if best is None or not best.num_rows:
        return pd.DataFrame(columns=STRIP_FACES_COLUMNS)
    frame = best.to_pandas()
    frame = frame.assign(_order=-frame["size_px"] if largest else frame["size_px"])
    return frame.sort_values(["_order", "image_id", "face_index"]).drop(columns="_order").reset_index(drop=True)


def render_report(
    metrics: pd.DataFrame,
    faces: pd.DataFrame,
    run_info: dict | None,
    storage_options: dict | None,
    max_thumbs: int,
    summary: dict[str, Any] | None = None,
    extra_html: str = "",
    strips: pd.DataFrame | None = None,
    scored_run: dict[str, Any] | None = None,
) -> str:
    """The report page. ``metrics`` and ``faces`` may be bounded samples (the grid's rows, the scatter's points)
    when ``summary`` (``summarize_output``) gives the counts and means of the whole output; ``extra_html`` (sections
    of other jobs, e.g. ``stylid score``'s gate and trend, HTML this package rendered) goes last. ``strips`` are
    the face rows whose zoomed strips are shown (``smallest_face_strips``; default: those of ``faces``);
    ``scored_run`` the mosaic counts of the run a scored output came from (``scored_run_mosaic``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = summary or summarize(metrics, faces)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4), layout="constrained")
    ax = axes[0]
    if len(faces):
        in_mosaic = faces["in_mosaic"] if "in_mosaic" in faces else pd.Series(None, index=faces.index, dtype=object)
        compared = faces[in_mosaic.fillna(False).astype(bool)]
        label = "output (with mosaic)" if len(compared) else "output"  # a scored output: whether is not known
        ax.scatter(faces["size_px"], faces["id_sim"], s=14, label=label, alpha=0.8)
        if len(compared):
            ax.scatter(compared["size_px"], compared["id_sim_no_mosaic"], s=14, marker="x", label="without mosaic")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend()
    ax.set_xlabel("face size (px, box side)")
    ax.set_ylabel("identity similarity to source (cosine)")
    ax.set_title("Identity kept versus face size")
    ax = axes[1]
    counts = summary["status_counts"]
    ax.bar(list(counts), list(counts.values()), color=["#4a4" if k == "ok" else "#c44" for k in counts])
    ax.set_title("Rows by status")
    identity_png = _png_of_figure(fig)
    plt.close(fig)

    run_info = run_info or {}
    scored = run_info.get("job") == "score"
    buckets = summary["buckets"]
    columns = list(dict.fromkeys(k for b in buckets for k in b))
    shown = [c for c in columns if c in ("size_bucket", "faces") or any(b.get(c) is not None for b in buckets)]
    thumbs = []
    ok = metrics[metrics["status"] == "ok"].sort_values("image_id").head(max_thumbs) if len(metrics) else metrics
    for _, row in ok.iterrows():
        before = _thumb(row["image_uri"], storage_options)
        after = _thumb(row["output_uri"], storage_options) if isinstance(row.get("output_uri"), str) else None
        if before is not None and after is not None:
            thumbs.append({"before": before, "after": after, "image_id": str(row["image_id"]),
                           "n_faces": int(row.get("n_faces") or 0), "id_sim": row.get("id_sim_mean"),
                           "id_sim_min": row.get("id_sim_min")})  # fmt: skip
    means = [(k, summary.get(k)) for k in ("id_sim_mean", "id_sim_mean_no_mosaic", "style_distance_mean",
                                            "colour_distance_mean", "content_ssim_mean")]  # fmt: skip
    strip_rows = faces if strips is None else strips
    from markupsafe import Markup

    return str(render_template(
        "report.html.j2",
        body_px=BODY_PX,
        engines=engines_described(summary["engines"]),
        run_info=run_info,
        backend=str(((run_info.get("config") or {}).get("faces") or {}).get("backend", "?")),
        status_rows=[(k, v) for k, v in sorted(summary["status_counts"].items())],
        identity_png=identity_png,
        bucket_columns=shown,
        bucket_rows=[[cell(b.get(c)) for c in shown] for b in buckets],
        left_out=[c for c in columns if c not in shown],
        scored=scored,
        scored_run=scored_run,
        means=means,
        small_strips=small_faces_html(strip_rows),
        large_strips=small_faces_html(strip_rows, largest=True),
        thumbs=thumbs,
        extra_html=Markup(extra_html),
    ))  # fmt: skip


def engines_described(engines: list[str]) -> str:
    """The engines line: each engine that ran (with its model); outputs scored from a manifest of pairs are
    ``external``, made outside stylid."""
    if not engines:
        return "(no image was stylized)"
    return ", ".join("external (made outside stylid: scored, not stylized here)" if e == "external" else e
                     for e in engines)  # fmt: skip


def scored_run_mosaic(run_info: dict | None, storage_options: dict | None) -> dict[str, Any] | None:
    """For a ``stylid score`` of a stylid output folder: that run's URI and its faces and ``in_mosaic`` per size
    bucket (from its ``run.json`` summary), the only place that knows which faces went through the mosaic; ``None``
    for other outputs or where it cannot be read."""
    if not run_info or run_info.get("job") != "score" or not isinstance(run_info.get("manifest"), str):
        return None
    uri = run_info["manifest"]
    try:
        scored = json.loads(read_bytes(join(uri, "run.json"), storage_options))
    except Exception:
        return None
    buckets = (scored.get("summary") or {}).get("buckets") or []
    rows = [(b.get("size_bucket"), b.get("faces"), cell(b.get("in_mosaic"))) for b in buckets]
    return {"uri": uri, "rows": rows} if rows and scored.get("job", "run") == "run" else None


def write_report(
    output_uri: str,
    storage_options: dict | None = None,
    max_thumbs: int = 24,
    max_face_points: int = 20_000,
    extra_html: str = "",
) -> str:
    """Render ``report.html`` for the output's ledger (plus ``extra_html`` sections); returns its URI. Counts and
    means come from a projected scan of every shard; the grid shows ``max_thumbs`` rows and the scatter at most
    ``max_face_points`` faces."""
    summary = summarize_output(output_uri, storage_options)
    if not summary["rows"]:
        raise ValueError(f"no metrics under {output_uri}: is it the output of 'stylid run'?")
    metrics = sample_ok_rows(output_uri, storage_options, max_thumbs)
    faces = sample_faces(output_uri, storage_options, max_face_points)
    strips = face_strips(output_uri, storage_options)
    try:
        run_info = json.loads(read_bytes(join(output_uri, "run.json"), storage_options))
    except Exception:
        run_info = None
    page = render_report(metrics, faces, run_info, storage_options, max_thumbs, summary, extra_html, strips,
                         scored_run_mosaic(run_info, storage_options))  # fmt: skip
    uri = join(output_uri, "report.html")
    write_bytes(uri, page.encode(), storage_options)
    return uri

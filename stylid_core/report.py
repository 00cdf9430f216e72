"""``report.html``: identity similarity versus face size, status counts and a before/after thumbnail grid.

Self-contained HTML (plots and thumbnails inlined as base64), written through fsspec next to the run's outputs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from stylid_core.faces.base import SIZE_BUCKETS
from stylid_core.imageio import decode_image, encode_jpeg
from stylid_core.storage import join, read_bytes, read_parquet_dir, write_bytes


def _png_of_figure(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def bucket_table(faces: pd.DataFrame) -> pd.DataFrame:
    """Per size bucket: faces, mean identity similarity with and without mosaic, match rates, re-detection."""
    order = [name for name, _ in SIZE_BUCKETS]
    if faces.empty:
        return pd.DataFrame(columns=["size_bucket", "faces"])
    g = faces.groupby("size_bucket")
    table = pd.DataFrame(
        {
            "faces": g.size(),
            "in_mosaic": g["in_mosaic"].sum(),
            "id_sim": g["id_sim"].mean(),
            "id_sim_no_mosaic": g["id_sim_no_mosaic"].mean(),
            "id_match": g["id_match"].mean(),
            "id_match_no_mosaic": g["id_match_no_mosaic"].mean(),
            "redetected": g["redetected"].mean(),
        }
    )
    table = table.reindex([b for b in order if b in table.index])
    return table.reset_index()


def summarize(metrics: pd.DataFrame, faces: pd.DataFrame) -> dict[str, Any]:
    """Counts and means of a whole output: rows by status, faces by bucket, identity by bucket."""
    ok = metrics[metrics["status"] == "ok"] if not metrics.empty else metrics
    buckets = bucket_table(faces)
    return {
        "rows": int(len(metrics)),
        "status_counts": {str(k): int(v) for k, v in metrics["status"].value_counts().items()} if len(metrics) else {},
        "faces": int(len(faces)),
        "engines": sorted({f"{e} ({m})" for e, m in zip(ok.get("engine", []), ok.get("model", []))}),
        "id_sim_mean": float(faces["id_sim"].mean()) if len(faces) else None,
        "id_sim_mean_no_mosaic": float(faces["id_sim_no_mosaic"].mean()) if len(faces) else None,
        "style_distance_mean": float(ok["style_distance"].mean()) if len(ok) else None,
        "content_ssim_mean": float(ok["content_ssim"].mean()) if len(ok) else None,
        "buckets": json.loads(buckets.to_json(orient="records")),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The closing summary printed by ``stylid run``."""
    lines = [f"rows: {summary['rows']}  " + "  ".join(f"{k}={v}" for k, v in sorted(summary["status_counts"].items()))]
    lines.append(f"engine: {', '.join(summary['engines']) or '(none ran)'}")
    lines.append(f"faces scored: {summary['faces']}")
    if summary["buckets"]:
        lines.append(
            f"{'bucket':>8} {'faces':>6} {'mosaic':>7} {'id_sim':>7} {'no_mosaic':>9} {'match':>6} {'redet':>6}"
        )
        for b in summary["buckets"]:
            lines.append(
                f"{b['size_bucket']:>8} {b['faces']:>6} {b['in_mosaic']:>7} {b['id_sim']:>7.3f} "
                f"{b['id_sim_no_mosaic']:>9.3f} {b['id_match']:>6.2f} {_fmt(b['redetected']):>6}"
            )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


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


def small_faces_html(faces: pd.DataFrame, max_faces: int = 16) -> str:
    """The report section of zoomed strips of the smallest faces (from the face rows' ``zoom_strip``)."""
    if faces.empty or "zoom_strip" not in faces:
        return ""
    rows = faces[faces["zoom_strip"].map(lambda v: isinstance(v, str) and len(v) > 0)]
    if rows.empty:
        return ""
    rows = rows.sort_values(["size_px", "image_id", "face_index"]).head(max_faces)
    parts = [
        "<h2>Smallest faces, zoomed</h2><p>Each strip: the source around the face, the output without the mosaic, "
        "the output with it (identity distance without / with the mosaic).</p><div class='grid'>"
    ]
    for _, r in rows.iterrows():
        parts.append(
            f"<div class='pair'><img src='data:image/jpeg;base64,{r['zoom_strip']}'><br>"
            f"{html.escape(str(r['image_id']))} "
            f"face {int(r['face_index'])}, {r['size_px']:.0f} px: id_dist {_fmt(r.get('id_dist_no_mosaic'))} / "
            f"{_fmt(r.get('id_dist'))}</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def render_report(
    metrics: pd.DataFrame, faces: pd.DataFrame, run_info: dict | None, storage_options: dict | None, max_thumbs: int
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = summarize(metrics, faces)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>stylid report</title><style>",
             "body{font-family:sans-serif;margin:24px;max-width:1200px} table{border-collapse:collapse}",
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}",
             ".grid{display:flex;flex-wrap:wrap;gap:12px}",
             ".pair{border:1px solid #ddd;padding:6px;font-size:12px} .pair img{max-height:220px}",
             ".engine{background:#fff4d6;padding:8px;border:1px solid #e0c070}</style></head><body>",
             "<h1>stylid report</h1>"]  # fmt: skip
    engines = ", ".join(summary["engines"]) or "(no image was stylized)"
    parts.append(f"<p class='engine'><b>Engine that ran:</b> {html.escape(engines)}</p>")
    if run_info:
        cfg = run_info.get("config", {})
        parts.append(
            f"<p>Run <code>{html.escape(str(run_info.get('config_hash', '')))}</code>, face backend "
            f"<b>{html.escape(str(cfg.get('faces', {}).get('backend', '?')))}</b>, manifest "
            f"<code>{html.escape(str(run_info.get('manifest', '')))}</code>.</p>"
        )
    parts.append("<h2>Rows</h2><table><tr><th>status</th><th>rows</th></tr>")
    for k, v in sorted(summary["status_counts"].items()):
        parts.append(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>")
    parts.append("</table>")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    if len(faces):
        ax.scatter(faces["size_px"], faces["id_sim"], s=14, label="with mosaic", alpha=0.8)
        compared = faces[faces["in_mosaic"]]
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
    parts.append(f"<h2>Identity and status</h2><img src='data:image/png;base64,{_png_of_figure(fig)}'>")
    plt.close(fig)

    buckets = bucket_table(faces)
    if len(buckets):
        parts.append("<h2>By face size</h2>" + buckets.to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    means = {
        k: summary[k] for k in ("id_sim_mean", "id_sim_mean_no_mosaic", "style_distance_mean", "content_ssim_mean")
    }
    parts.append("<p>" + ", ".join(f"{k}: {_fmt(v)}" for k, v in means.items()) + "</p>")

    parts.append(small_faces_html(faces))
    parts.append("<h2>Before / after</h2><div class='grid'>")
    ok = metrics[metrics["status"] == "ok"].sort_values("image_id").head(max_thumbs) if len(metrics) else metrics
    for _, row in ok.iterrows():
        before = _thumb(row["image_uri"], storage_options)
        after = _thumb(row["output_uri"], storage_options) if isinstance(row.get("output_uri"), str) else None
        if before is None or after is None:
            continue
        parts.append(
            f"<div class='pair'><img src='data:image/jpeg;base64,{before}'> <img src='data:image/jpeg;base64,{after}'>"
            f"<br>{html.escape(str(row['image_id']))}: {int(row['n_faces'] or 0)} faces, id_sim "
            f"{_fmt(row['id_sim_mean'])} (min {_fmt(row['id_sim_min'])})</div>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write_report(output_uri: str, storage_options: dict | None = None, max_thumbs: int = 24) -> str:
    """Render ``report.html`` from the metrics under ``output_uri``; returns its URI."""
    metrics = read_parquet_dir(join(output_uri, "metrics"), storage_options)
    if metrics.empty:
        raise ValueError(f"no metrics under {output_uri}: is it the output of 'stylid run'?")
    faces = read_parquet_dir(join(output_uri, "faces"), storage_options)
    try:
        run_info = json.loads(read_bytes(join(output_uri, "run.json"), storage_options))
    except Exception:
        run_info = None
    page = render_report(metrics, faces, run_info, storage_options, max_thumbs)
    uri = join(output_uri, "report.html")
    write_bytes(uri, page.encode(), storage_options)
    return uri

"""The nightly sections of ``report.html`` (``stylid score``): the regression gate's table and trend plots over the
previous nights' outputs (``--history PREFIX``), one line per face-size bucket, with each night's gate verdict.

Each night is read from its ``run.json`` only (the per-bucket summary and the gate verdict it records), so a long
history costs one small read per night, whatever the size of the outputs.
"""

from __future__ import annotations

import html
import json
import posixpath
from typing import Any

import pandas as pd

from stylid_core.faces.base import SIZE_BUCKETS
from stylid_core.storage import exists, filesystem, join, read_bytes

#: trend figures: per-bucket summary column -> axis label
TREND_FIGURES = {"id_sim": "mean identity similarity", "id_match": "match rate", "redetected": "re-detection rate"}


def _night(info: dict[str, Any], name: str) -> dict[str, Any]:
    gate = info.get("gate")
    return {
        "run": name,
        "finished": str(info.get("finished", "")),
        "buckets": (info.get("summary") or {}).get("buckets") or [],
        "style_distance": (info.get("summary") or {}).get("style_distance_mean"),
        "gate": None if gate is None else bool(gate.get("passed")),
        "failures": [] if gate is None else list(gate.get("failures") or []),
    }


def read_history(
    prefix: str, current: dict[str, Any], current_uri: str, limit: int, storage_options: dict | None = None
) -> list[dict[str, Any]]:
    """The last ``limit`` nights under ``prefix`` (finished outputs: ``_SUCCESS`` and ``run.json``), oldest first,
    ending with the current run (``current``: its ``run.json`` content, at ``current_uri``, which may lie under
    ``prefix`` or not). Nights are ordered by their name (the folder's, e.g. the date), not by when they finished,
    so a rescore of an old night keeps its place; nights whose names sort after the current one are left out (the
    trend of a night ends with it)."""
    fs, path = filesystem(prefix, storage_options)
    current_name = posixpath.basename(current_uri.rstrip("/"))
    nights = []
    try:
        entries = fs.ls(path, detail=True, refresh=True) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if name >= current_name:
            continue
        uri = join(prefix, name)
        try:
            if not exists(join(uri, "_SUCCESS"), storage_options):
                continue
            info = json.loads(read_bytes(join(uri, "run.json"), storage_options))
        except Exception:
            continue  # not a finished stylid output
        nights.append(_night(info, name))
    nights.sort(key=lambda n: n["run"])
    return [*nights[-(limit - 1) :], _night(current, current_name)] if limit > 1 else [_night(current, current_name)]


def history_frame(nights: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per night and size bucket: ``run``, ``bucket``, ``faces`` and the ``TREND_FIGURES``."""
    rows = [{"run": n["run"], "bucket": b.get("size_bucket"), "faces": b.get("faces"),
             **{k: b.get(k) for k in TREND_FIGURES}} for n in nights for b in n["buckets"]]  # fmt: skip
    return pd.DataFrame(rows, columns=["run", "bucket", "faces", *TREND_FIGURES])


def history_section_html(nights: list[dict[str, Any]]) -> str:
    """Trend plots (one line per size bucket over the nights, each night's gate verdict marked) and a verdict
    table, as a self-contained HTML section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stylid_core.report import _png_of_figure

    frame = history_frame(nights)
    names = [n["run"] for n in nights]
    x = {name: k for k, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(TREND_FIGURES) + 1, figsize=(4.5 * (len(TREND_FIGURES) + 1), 4), squeeze=False)
    style = [(x[n["run"]], n["style_distance"]) for n in nights if n["style_distance"] is not None]
    if style:
        axes[0][-1].plot(*zip(*style), marker="o", color="#555", label="all images")
    panels = [*TREND_FIGURES.items(), ("style_distance", "style distance (learned, all images)")]
    for ax, (figure, label) in zip(axes[0], panels):
        for bucket in [b for b, _ in SIZE_BUCKETS] if figure in TREND_FIGURES else []:
            sub = frame[frame["bucket"] == bucket].dropna(subset=[figure])
            if len(sub):
                ax.plot([x[r] for r in sub["run"]], sub[figure].astype(float), marker="o", label=bucket)
        top = ax.get_ylim()[1]
        for name, night in zip(names, nights):
            if night["gate"] is not None:
                ax.scatter([x[name]], [top], marker="o" if night["gate"] else "X", s=60, zorder=3,
                           color="#3a3" if night["gate"] else "#d22", clip_on=False)  # fmt: skip
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{label} per size bucket" if figure in TREND_FIGURES else label)
        ax.set_ylabel(label)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(title="face size", fontsize=8)
    image = _png_of_figure(fig)
    plt.close(fig)
    parts = [
        "<h2>Nightly trend</h2>",
        f"<p>Last {len(nights)} runs; markers on top: the gate's verdict that night (green: pass, red X: fail,"
        " none: no baseline).</p>",
        f"<img src='data:image/png;base64,{image}'>",
        "<table><tr><th>run</th><th>finished</th><th>gate</th><th>failures</th></tr>",
    ]
    for night in nights:
        verdict = "-" if night["gate"] is None else ("pass" if night["gate"] else "FAIL")
        failures = "<br>".join(html.escape(f) for f in night["failures"][:5])
        parts.append(f"<tr><td>{html.escape(night['run'])}</td><td>{html.escape(night['finished'][:19])}</td>"
                     f"<td>{verdict}</td><td style='text-align:left'>{failures}</td></tr>")  # fmt: skip
    parts.append("</table>")
    return "\n".join(parts)


def gate_section_html(gate: dict[str, Any], baseline_uri: str) -> str:
    """The gate's verdict and every check (figure, interval, threshold) as an HTML section."""
    checks = pd.DataFrame(gate["checks"])[
        ["bucket", "figure", "faces", "pairs", "baseline", "candidate", "diff", "ci_low", "ci_high", "drop",
         "abs_threshold", "rel_threshold", "status"]
    ]  # fmt: skip
    verdict = "PASS" if gate["passed"] else "FAIL"
    if gate["passed"] and not gate.get("gated", True):
        verdict = "NOT GATED (too few paired faces)"
    unpaired = gate.get("unpaired_faces")
    folded = gate.get("not_gated_alone") or {}
    parts = [
        f"<h2>Regression gate: {verdict}</h2>",
        f"<p>Baseline <code>{html.escape(baseline_uri)}</code>; {gate['shared_ids']} shared ids,"
        f" {gate['faces_paired']} faces paired; {html.escape(gate['interval'])}.</p>",
        checks.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"),
        "<ul>",
        *[f"<li>{html.escape(c['check'])}: {c['count']} (max {c['max']})</li>" for c in gate["counts"]],
        *(
            [
                f"<li>unpaired faces: {unpaired['count']} of {unpaired['faces']} ({unpaired['lost']} lost,"
                f" {unpaired['new']} new)</li>"
            ]
            if unpaired
            else []
        ),  # fmt: skip
        *[
            f"<li>not gated alone (too few faces): {html.escape(b)}, gated in {html.escape(into)}</li>"
            for b, into in folded.items()
        ],  # fmt: skip
        *[f"<li><b>FAIL</b> {html.escape(f)}</li>" for f in gate["failures"]],
        "</ul>",
    ]
    reference = gate.get("drift_gate")
    if reference:
        parts.append(f"<h3>Against the pinned reference <code>{html.escape(str(gate.get('reference')))}</code>:"
                     f" {'PASS' if reference['passed'] else 'FAIL'}</h3>")  # fmt: skip
        ref_checks = pd.DataFrame(reference["checks"])[list(checks.columns)]
        parts.append(ref_checks.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    return "\n".join(parts)

"""The nightly sections of ``report.html`` (``stylid score``): the regression gate's table and trend plots over the
previous nights' outputs (``--history PREFIX``), one line per face-size bucket, with each night's gate verdict.

Each night is read from its ``run.json`` only (the per-bucket summary and the gate verdict it records), so a long
history costs one small read per night, whatever the size of the outputs.
"""

from __future__ import annotations

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


#: colours of the bucket lines, in ``SIZE_BUCKETS`` order: none of them green or red, the verdict markers' colours
BUCKET_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2", "#7f7f7f", "#bcbd22")
PASS_COLOUR, FAIL_COLOUR = "#1a9641", "#d7191c"
#: failures of a night listed in its row of the verdict table; the rest fold under "N more"
FAILURES_SHOWN = 5


def trend_figure(nights: list[dict[str, Any]]):
    """The trend plots: one panel per ``TREND_FIGURES`` figure (a line per size bucket) and the style distance,
    on a 2 x 2 grid that fits the report's body (``BODY_PX``), each night's gate verdict marked on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stylid_core.report import BODY_PX, FIGURE_DPI

    frame = history_frame(nights)
    names = [n["run"] for n in nights]
    x = {name: k for k, name in enumerate(names)}
    width = (BODY_PX - 60) / FIGURE_DPI  # inches; the tight crop adds a few pixels of margin
    fig, grid = plt.subplots(2, 2, figsize=(width, width * 0.72), layout="constrained", squeeze=False)
    axes = grid.ravel()
    style = [(x[n["run"]], n["style_distance"]) for n in nights if n["style_distance"] is not None]
    if style:
        axes[-1].plot(*zip(*style), marker="o", color=BUCKET_COLOURS[-2], label="all images")
    panels = [*TREND_FIGURES.items(), ("style_distance", "style distance (learned)")]
    for ax, (figure, label) in zip(axes, panels):
        if figure in TREND_FIGURES:
            for (bucket, _), colour in zip(SIZE_BUCKETS, BUCKET_COLOURS):
                sub = frame[frame["bucket"] == bucket].dropna(subset=[figure])
                if len(sub):
                    ax.plot([x[r] for r in sub["run"]], sub[figure].astype(float), marker="o", color=colour,
                            label=bucket)  # fmt: skip
        verdicts = [(x[name], night["gate"]) for name, night in zip(names, nights) if night["gate"] is not None]
        for passed in (True, False):
            at = [k for k, v in verdicts if v is passed]
            if at:  # on the top edge of the panel, whatever its y range
                ax.scatter(at, [1.0] * len(at), transform=ax.get_xaxis_transform(), marker="o" if passed else "X",
                           s=50, zorder=3, color=PASS_COLOUR if passed else FAIL_COLOUR, clip_on=False)  # fmt: skip
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.5, max(len(names) - 0.5, 0.5))
        ax.set_title(f"{label} per size bucket" if figure in TREND_FIGURES else f"{label}, all images", pad=10,
                     fontsize=10)  # fmt: skip
        ax.set_ylabel(label, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the panels, where it hides no line
        fig.legend(handles, labels, title="face size", loc="outside lower center", ncols=len(labels), fontsize=8,
                   title_fontsize=8)  # fmt: skip
    return fig


def history_section_html(nights: list[dict[str, Any]]) -> str:
    """Trend plots (``trend_figure``) and a verdict table (every failure of a night: the first
    ``FAILURES_SHOWN``, the rest under "N more"), as a self-contained HTML section."""
    import matplotlib.pyplot as plt

    from stylid_core.report import _png_of_figure, render_template

    fig = trend_figure(nights)
    image = _png_of_figure(fig)
    plt.close(fig)
    rows = [{**n, "verdict": "\u2013" if n["gate"] is None else ("pass" if n["gate"] else "FAIL")} for n in nights]
    return str(render_template("nightly_trend.html.j2", nights=rows, image=image, shown=FAILURES_SHOWN,
                               pass_colour_name="green", fail_colour_name="red"))  # fmt: skip


#: the columns of the gate's table: (heading, how a check row gives it)
GATE_COLUMNS = ("bucket", "figure", "faces", "pairs", "baseline", "candidate", "diff", "interval", "drop", "allowed",
                "verdict")  # fmt: skip
VERDICTS = {"fail": "FAIL", "noise": "noise (pass)", "too_few_faces": "not gated (few faces)", "no_data": "no data"}


def _check_row(c: dict[str, Any]) -> list[str]:
    from stylid_core.report import cell

    interval = "\u2013" if c["ci_low"] is None else f"[{cell(c['ci_low'], 4)}, {cell(c['ci_high'], 4)}]"
    allowed = (
        " or ".join(
            ([cell(c["abs_threshold"], 4)] if c["abs_threshold"] is not None else [])
            + ([f"{c['rel_threshold']:.0%}"] if c["rel_threshold"] is not None else [])
        )
        or "\u2013"
    )
    return [c["bucket"], c["figure"], cell(c["faces"]), cell(c["pairs"]), cell(c["baseline"], 4),
            cell(c["candidate"], 4), cell(c["diff"], 4), interval, cell(c["drop"], 4), allowed,
            VERDICTS.get(c["status"], "pass")]  # fmt: skip


def _limit(v: float | int | None, share: bool = False) -> str:
    if v is None:
        return "no maximum"
    return f"at most {v:.1%}" if share else f"at most {v}"


def gate_section_html(gate: dict[str, Any], baseline_uri: str) -> str:
    """The gate's verdict and every check (figure, interval, threshold) as an HTML section, with the drift gate's
    (against the pinned reference or the median of the passing nights) below it."""
    from stylid_core.report import render_template

    verdict = "PASS" if gate["passed"] else "FAIL"
    if gate["passed"] and not gate.get("gated", True):
        verdict = "NOT GATED (too few paired faces)"
    unpaired = gate.get("unpaired_faces")
    if unpaired:
        unpaired = {**unpaired, "limit": f"{unpaired['share']:.1%}, {_limit(unpaired['max'], share=True)}"}
    counts = [{**c, "limit": _limit(c["max"])} for c in gate["counts"]]
    drift_base = (gate.get("drift_base") or {}).get("described")
    drift = gate.get("drift_gate")
    if drift:
        pinned = (gate.get("drift_base") or {}).get("kind", "reference") == "reference"
        reference = gate.get("reference") if pinned else None
        drift = {"reference": reference, "described": drift_base, "verdict": "PASS" if drift["passed"] else "FAIL",
                 "rows": [_check_row(c) for c in drift["checks"]]}  # fmt: skip
    return str(render_template(
        "nightly_gate.html.j2", gate=gate, verdict=verdict, baseline=baseline_uri, drift_base=drift_base,
        check_columns=GATE_COLUMNS, check_rows=[_check_row(c) for c in gate["checks"]], counts=counts,
        unpaired=unpaired, folded=list((gate.get("not_gated_alone") or {}).items()), drift=drift,
    ))  # fmt: skip

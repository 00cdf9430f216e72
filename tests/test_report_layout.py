"""The report as a reader sees it (issue 26 item 7), checked on the rendered HTML and the images it embeds: every
image fits the 1,200 px body, no y-label runs into the next trend panel, verdict markers share no colour with a
bucket line, a night's failures are all there, no raw ``None`` or ``nan``, a scored output does not claim
``in_mosaic 0``, an external engine reads as such, and ids are escaped everywhere."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.colors import to_hex
from PIL import Image

from stylid_core.faces.base import SIZE_BUCKETS
from stylid_core.gate import GateConfig, compare_runs
from stylid_core.imageio import encode_png
from stylid_core.ledger import write_shard_pair
from stylid_core.nightly_report import (
    FAIL_COLOUR,
    PASS_COLOUR,
    gate_section_html,
    history_section_html,
    trend_figure,
)
from stylid_core.report import BODY_PX, format_summary, render_report, summarize, write_report, zoom_strip

HOSTILE = "<script>alert(1)</script>"


class _Page(HTMLParser):
    """The text nodes of a page, and the tags it opens."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.tags: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        if data.strip():
            self.texts.append(data.strip())


def _pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r"data:image/png;base64,([\w+/=]+)", page)]


def _nights(n: int = 14, failures: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    nights = []
    for k in range(n):
        buckets = [{"size_bucket": b, "faces": 20, "id_sim": 0.8 + 0.02 * i + rng.normal(0, 0.01),
                    "id_match": 0.9 + rng.normal(0, 0.02), "redetected": 0.95 + rng.normal(0, 0.02)}
                   for i, (b, _) in enumerate(SIZE_BUCKETS)]  # fmt: skip
        failed = k == n - 2
        listed = [f"failure {j} of {HOSTILE}" for j in range(failures)] if failed else []
        nights.append({"run": f"2026-12-{k + 1:02d}", "finished": f"2026-12-{k + 1:02d}T02:00:00",
                       "buckets": buckets, "style_distance": 1.4 + 0.01 * k, "gate": None if k == 0 else not failed,
                       "failures": listed})  # fmt: skip
    return nights


def test_the_trend_image_fits_the_body_and_no_y_label_runs_into_another_panel():
    page = history_section_html(_nights())
    (image,) = _pngs(page)
    assert image.width <= BODY_PX  # it was 1,623 px: the style panel was cut off
    fig = trend_figure(_nights())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    assert len(axes) == 4
    for ax in axes:
        label = ax.yaxis.label.get_window_extent(renderer)
        for other in axes:
            if other is not ax:
                assert not label.overlaps(other.get_tightbbox(renderer)), (ax.get_ylabel(), other.get_title())
    width_px = fig.get_size_inches()[0] * fig.dpi
    assert all(ax.get_tightbbox(renderer).x1 <= width_px for ax in axes)  # nothing drawn past the right edge


def test_verdict_markers_share_no_colour_with_a_bucket_line():
    fig = trend_figure(_nights())
    lines = {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()}
    markers = {to_hex(c) for ax in fig.axes for col in ax.collections for c in col.get_facecolors()}
    assert markers == {to_hex(PASS_COLOUR), to_hex(FAIL_COLOUR)}
    assert len(lines) >= len(SIZE_BUCKETS) and not lines & markers  # the 48-64 px line was the pass green


def test_a_nights_failure_table_shows_every_failure_and_how_many_more():
    page = history_section_html(_nights(failures=8))
    text = " ".join(_Page(page).texts)
    assert all(f"failure {j} of {HOSTILE}" in text for j in range(8))  # all 8, escaped in the page
    assert "3 more" in text and page.count("<details>") == 1
    assert HOSTILE not in page and "&lt;script&gt;" in page
    few = history_section_html(_nights(failures=5))
    assert "more" not in " ".join(_Page(few).texts) and "<details>" not in few


def _scored_output(tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A scored output of pairs made outside stylid: engine external, no model, no mosaic knowledge (null)."""
    ids = [f"{HOSTILE}{k}" for k in range(12)]
    image = np.full((60, 80, 3), 120, np.uint8)
    for k in range(12):
        (tmp_path / f"src{k}.png").write_bytes(encode_png(image))
    metrics = pd.DataFrame({"image_id": ids, "status": "ok", "error": None, "engine": "external", "model": None,
                            "image_uri": [str(tmp_path / f"src{k}.png") for k in range(12)],
                            "output_uri": [str(tmp_path / f"src{k}.png") for k in range(12)], "n_faces": 1,
                            "id_sim_mean": 0.9, "id_sim_min": 0.9, "style_distance": 1.5, "colour_distance": 3.0,
                            "content_ssim": 0.7})  # fmt: skip
    strip = zoom_strip((0.0, 0.0, 10.0, 10.0), np.zeros((20, 20, 3), np.uint8))
    faces = pd.DataFrame({"image_id": ids, "face_index": 0, "x0": 0.0, "y0": 0.0, "x1": 40.0, "y1": 40.0,
                          "size_px": 40.0, "size_bucket": "32-48", "id_sim": np.linspace(0.85, 0.95, 12),
                          "id_dist": 0.4, "id_dist_no_mosaic": None, "id_match": True, "redetected": True,
                          "in_mosaic": pd.array([None] * 12, dtype="boolean"), "id_sim_no_mosaic": None,
                          "zoom_strip": strip})  # fmt: skip
    return metrics, faces


def test_the_page_has_no_raw_none_and_every_image_fits(tmp_path):
    metrics, faces = _scored_output(tmp_path)
    gate = compare_runs(metrics, faces.assign(id_sim=faces["id_sim"] - 0.05), metrics, faces, GateConfig())
    described = "the median of the last 2 passing nights (a, b)"
    gate = {**gate, "reference": None, "drift_gate": gate, "drift_base": {"kind": "median", "described": described}}
    extra = gate_section_html(gate, "s3://b/n1/") + history_section_html(_nights())
    run_info = {"job": "score", "config_hash": "abc", "config": {"faces": {"backend": "dlib"}}, "manifest": "pairs"}
    page = render_report(metrics, faces, run_info, None, 24, summarize(metrics, faces), extra)
    texts = _Page(page).texts
    assert not [t for t in texts if re.search(r"\b(None|nan|NaN)\b", t)]  # was `max None`, `id_sim_no_mosaic None`
    assert "only_in_candidate: 0 (no maximum)" in texts
    assert "Against the median of the last 2 passing nights (a, b): FAIL" in texts
    assert len(_pngs(page)) == 2 and all(image.width <= BODY_PX for image in _pngs(page))
    # ids are escaped wherever they appear: thumbnails, strips, failures
    assert HOSTILE not in page and "script" not in _Page(page).tags
    assert page.count(f"{HOSTILE.replace('<', '&lt;').replace('>', '&gt;')}0") >= 2


def test_a_scored_output_says_external_and_does_not_claim_in_mosaic_0(tmp_path):
    metrics, faces = _scored_output(tmp_path)
    summary = summarize(metrics, faces)
    assert summary["engines"] == ["external"]  # was "external (None)"
    assert summary["buckets"][0]["in_mosaic"] is None
    printed = format_summary(summary)
    assert "engine: external" in printed and "None" not in printed
    assert re.search(r"32-48\s+12\s+n/a", printed)
    # the output of a scored stylid run: the report shows that run's mosaic counts, from its run.json
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"job": "run", "summary": {"buckets": [
        {"size_bucket": "32-48", "faces": 12, "in_mosaic": 12}]}}))  # fmt: skip
    scored = tmp_path / "scored"
    write_shard_pair(str(scored), pa.Table.from_pandas(faces), pa.Table.from_pandas(metrics), None)
    (scored / "run.json").write_text(json.dumps({"job": "score", "manifest": str(run), "config": {}}))
    page = (scored / "report.html").read_text() if write_report(str(scored)) else ""
    texts = _Page(page).texts
    assert any(t.startswith("Engine that ran:") for t in texts)
    assert "external (made outside stylid: scored, not stylized here)" in texts
    assert "Mosaic in the scored run" in texts and str(run) in texts
    by_size = page.split("<h2>By face size</h2>", 1)[1].split("</table>", 1)[0]
    assert "in_mosaic" not in by_size  # no column of zeros for what the scoring cannot know
    mosaic = page.split("Mosaic in the scored run", 1)[1].split("</table>", 1)[0]
    assert re.search(r"<td>32-48</td><td>12</td><td>12</td>", mosaic)

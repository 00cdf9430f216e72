"""The nightly trend section: which previous outputs count as nights, their order, the limit, the verdicts."""

from __future__ import annotations

import json
import os

from stylid_core.nightly_report import history_frame, history_section_html, read_history


def _night(root, name: str, finished: str, id_sim: float, passed: bool | None, success: bool = True) -> dict:
    info = {"finished": finished, "summary": {"buckets": [{"size_bucket": "<32", "faces": 4, "id_sim": id_sim,
                                                           "id_match": 1.0, "redetected": 1.0}],
                                              "style_distance_mean": 3.0}}  # fmt: skip
    if passed is not None:
        info["gate"] = {"passed": passed, "failures": [] if passed else [f"bucket <32: id_sim worsened ({name})"]}
    os.makedirs(root / name)
    (root / name / "run.json").write_text(json.dumps(info))
    if success:
        (root / name / "_SUCCESS").write_text("")
    return info


def test_history_reads_finished_nights_in_order_and_ends_with_this_run(tmp_path):
    _night(tmp_path, "b-second", "2026-11-29T02:00:00", 0.91, True)
    _night(tmp_path, "a-first", "2026-11-28T02:00:00", 0.92, None)
    _night(tmp_path, "c-crashed", "2026-11-30T02:00:00", 0.10, True, success=False)  # no _SUCCESS: not a night
    (tmp_path / "notes.txt").write_text("not a run")
    os.makedirs(tmp_path / "empty")
    current = _night(tmp_path, "d-tonight", "2026-12-01T02:00:00", 0.80, False, success=False)
    nights = read_history(str(tmp_path), current, str(tmp_path / "d-tonight"), limit=14)
    assert [n["run"] for n in nights] == ["a-first", "b-second", "d-tonight"]
    assert [n["gate"] for n in nights] == [None, True, False]
    assert history_frame(nights)["id_sim"].tolist() == [0.92, 0.91, 0.80]
    assert [n["run"] for n in read_history(str(tmp_path), current, str(tmp_path / "d-tonight"), limit=2)] == [
        "b-second",
        "d-tonight",
    ]
    page = history_section_html(nights)
    assert page.count("<td>FAIL</td>") == 1 and page.count("<td>pass</td>") == 1
    assert "id_sim worsened (d-tonight)" in page and "data:image/png;base64," in page


def test_history_of_an_empty_prefix_is_this_run_alone(tmp_path):
    current = {"finished": "x", "summary": {"buckets": []}}
    nights = read_history(str(tmp_path / "nothing-here"), current, "s3://b/scores/today/", limit=5)
    assert [n["run"] for n in nights] == ["today"]
    assert "Nightly trend" in history_section_html(nights)


def test_history_orders_nights_by_name_so_a_rescored_old_night_keeps_its_place(tmp_path):
    _night(tmp_path, "2026-12-01", "2026-12-01T02:00:00", 0.90, None)
    _night(tmp_path, "2026-12-02", "2026-12-09T15:00:00", 0.91, True)  # rescored a week later
    _night(tmp_path, "2026-12-03", "2026-12-03T02:00:00", 0.92, True)
    current = _night(tmp_path, "2026-12-04", "2026-12-04T02:00:00", 0.93, True)
    nights = read_history(str(tmp_path), current, str(tmp_path / "2026-12-04"), limit=14)
    assert [n["run"] for n in nights] == ["2026-12-01", "2026-12-02", "2026-12-03", "2026-12-04"]
    # the old night's own report, rescored: its trend ends with it, in its place
    old = read_history(str(tmp_path), current, str(tmp_path / "2026-12-02"), limit=14)
    assert [n["run"] for n in old] == ["2026-12-01", "2026-12-02"]


def test_the_gate_section_shows_unpaired_faces_folded_buckets_and_the_reference():
    import pandas as pd

    from stylid_core.gate import GateConfig, compare_runs
    from stylid_core.nightly_report import gate_section_html

    metrics = pd.DataFrame([{"image_id": f"i{k}", "status": "ok", "error": None, "content_ssim": 0.7 + k / 100}
                            for k in range(12)])  # fmt: skip
    faces = pd.DataFrame([{"image_id": f"i{k}", "face_index": 0, "x0": 0.0, "y0": 0.0, "x1": 40.0, "y1": 40.0,
                           "size_bucket": "32-48", "id_sim": 0.9 + k / 1000} for k in range(12)])  # fmt: skip
    worse = faces.assign(id_sim=faces["id_sim"] - 0.1)
    night = compare_runs(metrics, faces, metrics, faces, GateConfig())
    drift = compare_runs(metrics, worse, metrics, faces, GateConfig())
    page = gate_section_html({**night, "reference": "s3://b/ref/", "drift_gate": drift}, "s3://b/n1/")
    assert "Regression gate: PASS" in page and "unpaired faces: 0 of 12" in page
    assert "not gated alone (too few faces): 32-48, gated in all" in page
    assert "Against the pinned reference <code>s3://b/ref/</code>: FAIL" in page

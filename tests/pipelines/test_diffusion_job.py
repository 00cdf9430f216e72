"""The diffusion stylize stage inside Ray Data end to end: ``stylid run --config configs/stylize_tiny.yaml``."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from stylid_core.stylize.diffusion.tiny import TINY_MODEL_NAME
from tests.pipelines.conftest import write_manifest

TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "stylize_tiny.yaml")


@pytest.fixture(scope="module")
def diffusion_run(ray_session, inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusion")
    rows = [{"image_id": k, "image_uri": inputs[k]} for k in ("scene", "biden", "noface", "notimage")]
    manifest = write_manifest(str(tmp / "manifest.parquet"), rows)
    output = tmp / "out"
    # the shipped tiny config, cut to 2 steps at 64 px so the run stays a few seconds of model time
    code = main(["run", "--config", TINY_CONFIG, "--manifest", manifest, "--output", str(output), "--num-cpus", "2",
                 "--set", "stylize.options.steps=2", "--set", "stylize.options.resolution=64"])  # fmt: skip
    assert code == 0
    return output


@pytest.mark.slow
def test_tiny_diffusion_config_runs_every_row_through_ray_data(diffusion_run):
    metrics = pd.concat([pq.read_table(f).to_pandas() for f in glob.glob(f"{diffusion_run}/metrics/part-*.parquet")])
    assert sorted(metrics["image_id"]) == ["biden", "noface", "notimage", "scene"]
    status = dict(zip(metrics["image_id"], metrics["status"]))
    assert status == {"scene": "ok", "biden": "ok", "noface": "no_face", "notimage": "decode_error"}
    ok = metrics[metrics["status"] == "ok"]
    assert set(ok["engine"]) == {"diffusion"} and set(ok["model"]) == {TINY_MODEL_NAME}
    with open(diffusion_run / "run.json") as f:
        run = json.load(f)
    assert run["config"]["stylize"]["engine"] == "diffusion" and run["config"]["stylize"]["options"]["steps"] == 2
    images = sorted(os.listdir(diffusion_run / "images"))
    assert images == [f"biden-{run['config_hash']}.png", f"scene-{run['config_hash']}.png"]
    # every face of the scene was scored on the diffusion output (the small ones through the mosaic)
    faces = pd.concat([pq.read_table(f).to_pandas() for f in glob.glob(f"{diffusion_run}/faces/part-*.parquet")])
    scene = faces[faces["image_id"] == "scene"]
    assert len(scene) == int(ok.set_index("image_id").loc["scene", "n_faces"]) >= 1
    assert scene["in_mosaic"].any() and scene["id_sim"].notna().all()
    assert (diffusion_run / "_SUCCESS").is_file()
    html = (diffusion_run / "report.html").read_text()
    assert f"diffusion ({TINY_MODEL_NAME})" in html

"""Memory per image is bounded: images over ``io.max_work_pixels`` are worked on downscaled (the engines and the
face analyzer never see more pixels) and written back at their own size with face boxes in source pixels; the
memory a stage needs is declared to Ray and checked against the cluster before the job starts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipelines.stages
from pipelines.stages import FusedCPUStage, prepare_rows
from pipelines.stylize import stylize_chain
from stylid_core.config import ConfigError, JobConfig
from stylid_core.imageio import decode_image_bounded, work_size
from stylid_core.ledger import FACE_ROWS
from stylid_core.sample_data import background, place_face
from tests.pipelines.conftest import check_run_fits as _check_fits
from tests.pipelines.conftest import run_pool_size as _pool_size


def _photo(path, width: int, height: int, face_px: int, fmt: str) -> str:
    scene = background(width, height).copy()
    place_face(scene, "obama", face_px, (width // 2, height // 2))
    Image.fromarray(scene).save(path, format=fmt, quality=92)
    return str(path)


def test_decode_bounded_keeps_aspect_and_reports_the_source_size(tmp_path):
    path = _photo(tmp_path / "p.jpg", 1200, 800, 200, "JPEG")
    with open(path, "rb") as f:
        data = f.read()
    image, source = decode_image_bounded(data, max_work_pixels=240_000)
    assert source == (1200, 800)
    assert image.shape[1] * image.shape[0] <= 240_000 and image.shape[:2] == (400, 600)
    full, _ = decode_image_bounded(data, max_work_pixels=None)
    assert full.shape[:2] == (800, 1200)
    # the downscaled decode (DCT-scaled JPEG, then resized) is the same picture as a resize of the full one
    ref = np.asarray(Image.fromarray(full).resize((600, 400), Image.LANCZOS), dtype=float)
    assert np.abs(image.astype(float) - ref).mean() < 4
    assert work_size(1200, 800, 10**9) == (1200, 800)


def test_a_large_image_is_worked_on_small_and_written_at_its_own_size(tmp_path, monkeypatch):
    path = _photo(tmp_path / "big.png", 1600, 1200, 240, "PNG")  # 1.92 MP
    limit = 480_000  # worked at 800 x 600
    seen: list[tuple[int, int]] = []
    stylize = pipelines.stages.StylizeStage._run

    def spy(self, images, styles, faces):
        seen.extend(im.shape[:2] for im in images)
        return stylize(self, images, styles, faces)

    monkeypatch.setattr(pipelines.stages.StylizeStage, "_run", spy)
    config = JobConfig.from_dict({"io": {"max_work_pixels": limit}, "score": {"redetect": False}})
    out = tmp_path / "out"
    stage = FusedCPUStage([(s.cls, s.kwargs) for s in stylize_chain(config, str(out), key_suffix="")])
    row = stage(prepare_rows(pd.DataFrame([{"image_id": "big", "image_uri": path}]), None)).to_pandas().iloc[0]
    assert row["status"] == "ok" and row["n_faces"] == 1
    assert (row["width"], row["height"]) == (800, 600) and (row["source_width"], row["source_height"]) == (1600, 1200)
    assert seen == [(600, 800)]  # the engine got the working size, not the source
    with Image.open(out / "images" / "big.png") as written:
        assert written.size == (1600, 1200)
    face = row[FACE_ROWS][0]  # the face rows the driver's shard writer stores
    x0, y0, x1, y1 = (face[k] for k in ("x0", "y0", "x1", "y1"))
    # the box is in source pixels: around the face placed at the centre of the 1600 x 1200 photo, ~240 px wide
    assert abs((x0 + x1) / 2 - 800) < 60 and abs((y0 + y1) / 2 - 600) < 80 and 150 < x1 - x0 < 360


def test_memory_is_declared_to_ray_and_checked_against_the_cluster():
    config = JobConfig()
    assert config.resources.fused.ray_memory() == {"memory": 1536 * 2**20}
    assert JobConfig.from_dict({"resources": {"fused": {"memory_mb": 0}}}).resources.fused.ray_memory() == {}
    gib = 2**30
    _check_fits(config, cpus=2, gpus=0, memory=8 * gib)
    with pytest.raises(ConfigError, match="memory_mb"):
        _check_fits(config, cpus=2, gpus=0, memory=1 * gib)
    # the fused pool gets no more actors than the memory holds
    assert _pool_size(config, 8, memory=64 * gib) == 8
    assert _pool_size(config, 8, memory=4 * gib) == 2
    with pytest.raises(ConfigError, match="memory_mb must be"):
        JobConfig.from_dict({"resources": {"fused": {"memory_mb": -1}}})


def test_retry_settings_do_not_change_the_config_identity():
    base = JobConfig()
    tuned = JobConfig.from_dict({"io": {"retries": 9, "retry_backoff_s": 1.0, "request_timeout_s": 5}})
    assert tuned.config_hash() == base.config_hash() and tuned.is_default()
    assert tuned.io.retry.attempts == 9 and tuned.io.retry.timeout_s == 5
    assert JobConfig.from_dict({"io": {"max_work_pixels": 1_000_000}}).config_hash() != base.config_hash()
    with pytest.raises(ConfigError):
        JobConfig.from_dict({"io": {"retries": 0}})


def test_the_gpu_config_declares_every_stage_memory_and_a_small_node_is_refused():
    from jobs.config import load_job_config

    config = load_job_config("stylize_sd15", [])
    res = config.resources
    declared = {k: getattr(res, k).ray_memory().get("memory", 0) for k in ("faces", "stylize", "score")}
    assert all(v > 0 for v in declared.values()), declared  # each pool tells Ray what it holds
    need = sum(declared.values())
    _check_fits(config, cpus=16, gpus=1, memory=need + 2**30)  # fits
    with pytest.raises(ConfigError, match="memory"):
        _check_fits(config, cpus=16, gpus=1, memory=need - 2**30)  # a node too small is refused up front

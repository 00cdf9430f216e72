"""The stages called directly on pandas batches (no Ray): rows are never dropped, failures become statuses and
failed rows pass later stages untouched."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.schema import FACE_COLUMNS, METRICS_COLUMNS
from pipelines.stages import (
    FaceStage,
    FusedCPUStage,
    LoadStage,
    ScoreStage,
    StylizeStage,
    WriteStage,
    image_of,
    prepare_rows,
)
from pipelines.stylize import stylize_chain
from stylid_core.config import JobConfig
from stylid_core.ledger import FACE_ROWS, ShardWriter


@pytest.fixture(scope="module")
def config() -> JobConfig:
    return JobConfig.from_dict({"faces": {"upsample": 1}, "score": {"redetect": True}})


@pytest.fixture(scope="module")
def batch(inputs, tmp_path_factory) -> pd.DataFrame:
    missing = str(tmp_path_factory.mktemp("gone") / "missing.jpg")
    manifest = pd.DataFrame(
        {
            "image_id": ["good", "missing", "notimage", "noface", "empty"],
            "image_uri": [inputs["obama"], missing, inputs["notimage"], inputs["noface"], ""],
        }
    )
    return prepare_rows(manifest, None)


@pytest.fixture(scope="module")
def staged(batch, config):
    """The batch after each stage, as pandas frames."""
    out = {"prepared": batch}
    out["load"] = LoadStage(config.io)(batch).to_pandas()
    out["faces"] = FaceStage(config.faces)(out["load"]).to_pandas()
    out["stylize"] = StylizeStage(config.stylize, config.score, config.io)(out["faces"]).to_pandas()
    out["score"] = ScoreStage(config.faces, config.score, config.io)(out["stylize"]).to_pandas()
    return out


EXPECTED = {"good": "ok", "missing": "missing", "notimage": "decode_error", "noface": "no_face", "empty": "missing"}


def test_prepare_rows_fills_ids_styles_and_flags_empty_uris(batch):
    assert list(batch["image_id"]) == list(EXPECTED)
    assert batch.set_index("image_id").at["empty", "status"] == "missing"
    assert batch["style_uri"].str.endswith("style_painting.jpg").all()
    derived = prepare_rows(pd.DataFrame({"image_uri": ["/a.jpg", "/b.jpg"]}), "s3://b/style.png")
    assert derived["image_id"].str.fullmatch(r"[0-9a-f]{16}").all() and derived["image_id"].nunique() == 2
    assert (derived["style_uri"] == "s3://b/style.png").all()


def test_every_row_is_kept_with_the_right_status_and_error(staged):
    for name, df in staged.items():
        assert list(df["image_id"]) == list(EXPECTED), name
    final = staged["score"].set_index("image_id")
    for image_id, status in EXPECTED.items():
        assert final.at[image_id, "status"] == status, image_id
    assert pd.isna(final.at["good", "error"])
    for image_id in ("missing", "notimage", "noface", "empty"):
        assert isinstance(final.at[image_id, "error"], str) and final.at[image_id, "error"]
    assert "not found" in final.at["missing", "error"]
    assert "no face" in final.at["noface", "error"]


def test_load_stage_decodes_good_rows(staged, inputs):
    row = staged["load"].set_index("image_id").loc["good"]
    image = image_of(row)
    assert image.shape == (int(row["height"]), int(row["width"]), 3) and max(image.shape[:2]) == 200


def test_failed_rows_pass_later_stages_untouched(staged):
    """A row that failed at stage k keeps the exact values of every column it had after stage k."""
    failed_at = {"missing": "load", "empty": "prepared", "notimage": "load", "noface": "faces"}
    order = ["prepared", "load", "faces", "stylize", "score"]
    for image_id, stage in failed_at.items():
        before = staged[stage].set_index("image_id").loc[image_id]
        for later in order[order.index(stage) + 1 :]:
            after = staged[later].set_index("image_id").loc[image_id]
            for col in before.index:
                b, a = before[col], after[col]
                assert (pd.isna(b) and pd.isna(a)) or b == a, f"{image_id}: {col} changed in {later}"
        final = staged["score"].set_index("image_id").loc[image_id]
        assert pd.isna(final["out_pixels"]) and pd.isna(final["id_sim_mean"])


def test_good_row_gets_faces_output_and_scores(staged, config):
    row = staged["score"].set_index("image_id").loc["good"]
    assert row["n_faces"] == 1 and row["n_faces_detected"] == 1
    out = image_of(row, "out_pixels")
    assert out.shape == image_of(row).shape and not np.array_equal(out, image_of(row))
    assert 0 < row["id_sim_mean"] <= 1 and row["id_match_rate"] == 1.0
    assert row["colour_distance"] < row["colour_distance_source"]
    assert row["style_distance"] < row["style_distance_source"]  # the learned judge: nearer the painting
    assert row["n_redetected"] == 1
    faces = json.loads(row["faces_json"])
    assert faces[0]["scores"]["id_dist"] < 0.6
    scores = faces[0]["scores"]  # the face's detail: neither the photo's (1.0) nor unrelated to it
    assert 0 < scores["photo_detail_fine"] < 0.999 and 0 < scores["photo_detail_mid"] < 0.999
    assert faces[0]["scores"]["in_mosaic"] is (faces[0]["size_px"] < config.stylize.mosaic.max_face_px)
    assert row["mosaic_faces"] == int(faces[0]["scores"]["in_mosaic"])
    assert row["engine"] == "neural"


def test_write_stage_writes_images_and_hands_metrics_with_face_rows_to_the_shard_writer(staged, config, tmp_path):
    table = WriteStage(str(tmp_path), config.config_hash(), "", config.io)(staged["score"])
    out = table.to_pandas()
    assert list(out.columns) == [*METRICS_COLUMNS, FACE_ROWS]
    assert list(out["image_id"]) == list(EXPECTED)
    good = out.set_index("image_id").loc["good"]
    assert good["output_uri"] == str(tmp_path / "images" / "good.png")
    assert (tmp_path / "images" / "good.png").is_file()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["good.png"]
    assert not (tmp_path / "metrics").exists()  # shards are the ShardWriter's
    n_faces = {k: len(v) for k, v in zip(out["image_id"], out[FACE_ROWS])}
    assert n_faces == {"good": 1, "missing": 0, "notimage": 0, "noface": 0, "empty": 0}
    writer = ShardWriter(str(tmp_path), {}, rows_per_shard=1000)
    writer.add(table)
    writer.flush()
    metrics = pq.read_table(next((tmp_path / "metrics").glob("part-*.parquet")))
    assert metrics.schema.names == METRICS_COLUMNS and sorted(metrics["image_id"].to_pylist()) == sorted(EXPECTED)
    faces = pq.read_table(next((tmp_path / "faces").glob("part-*.parquet")))
    assert faces.schema.names == list(FACE_COLUMNS)
    assert faces.to_pandas()["image_id"].tolist() == ["good"]
    assert faces["id_sim"].to_pylist() == [json.loads(staged["score"].at[0, "faces_json"])[0]["scores"]["id_sim"]]


def test_a_stylize_failure_fails_only_its_row(staged, config, monkeypatch):
    stage = StylizeStage(config.stylize, config.score, config.io)
    two = pd.concat([staged["faces"], staged["faces"].iloc[[0]].assign(image_id="good2")], ignore_index=True)
    real = stage.stylizer.stylize_batch
    calls = []

    def flaky(contents, styles, faces=None, content_regions=None):
        calls.append(1)
        if len(calls) <= 2:  # the batch call, then the first row's retry
            raise RuntimeError("boom")
        return real(contents, styles, faces, content_regions=content_regions)

    monkeypatch.setattr(stage.stylizer, "stylize_batch", flaky)
    out = stage(two).to_pandas().set_index("image_id")
    # the batch call fails (call 1), the first row-by-row retry fails (call 2), the second row succeeds
    assert out.at["good", "status"] == "stylize_error" and "boom" in out.at["good", "error"]
    assert out.at["good2", "status"] == "ok" and isinstance(out.at["good2", "out_pixels"], bytes)
    assert out.at["noface", "status"] == "no_face"


def test_fused_cpu_stage_equals_the_three_stages_in_turn(staged, config):
    models = [(s.cls, s.kwargs) for s in stylize_chain(config) if s.kind != "io"]
    fused = FusedCPUStage(models)(staged["load"]).to_pandas()
    separate = staged["score"]
    assert list(fused.columns) == list(separate.columns)
    assert fused["status"].tolist() == separate["status"].tolist()
    assert fused["out_pixels"].tolist() == separate["out_pixels"].tolist()  # byte-identical images
    # the faces crossed the fused stages parsed and were written as JSON once: the same text as three round trips
    assert fused["faces_json"].tolist() == separate["faces_json"].tolist()
    for col in ("id_sim_mean", "colour_distance", "content_ssim"):
        np.testing.assert_allclose(fused[col].astype(float), separate[col].astype(float), equal_nan=True)


def test_fused_stage_with_io_equals_load_fused_write(batch, staged, config, tmp_path):
    """``resources.fuse_io``: the actor that also loads and writes returns the same metrics and stores the same
    files as the load stage, the fused stage and the write stage called in turn."""
    write = {"config_hash": config.config_hash(), "key_suffix": ""}
    apart = WriteStage(str(tmp_path / "apart"), io=config.io, **write)(staged["score"]).to_pandas()
    stage = FusedCPUStage([(s.cls, s.kwargs) for s in stylize_chain(config, str(tmp_path / "fused"), key_suffix="")])
    assert [type(s).__name__ for s in stage.stages] == [
        "LoadStage", "FaceStage", "StylizeStage", "ScoreStage", "WriteStage"
    ]  # fmt: skip
    together = stage(batch).to_pandas()
    assert list(together.columns) == [*METRICS_COLUMNS, FACE_ROWS]
    assert together["status"].tolist() == apart["status"].tolist() == list(EXPECTED.values())
    for col in ("id_sim_mean", "colour_distance", "content_ssim", "n_faces"):
        np.testing.assert_allclose(together[col].astype(float), apart[col].astype(float), equal_nan=True)
    assert [len(v) for v in together[FACE_ROWS]] == [len(v) for v in apart[FACE_ROWS]] == [1, 0, 0, 0, 0]
    assert together[FACE_ROWS].tolist()[0] == apart[FACE_ROWS].tolist()[0]  # the same face rows, strip included
    names = sorted(p.name for p in (tmp_path / "apart" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fused" / "images").iterdir()) == ["good.png"]
    assert (tmp_path / "fused/images/good.png").read_bytes() == (tmp_path / "apart/images/good.png").read_bytes()


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_concurrent_reads_keep_each_row_its_own_bytes_and_failure(inputs, config, tmp_path, scheme):
    """The load batch's reads run in threads (URIs with a protocol; plain local paths are read in turn): every
    row still gets its own image and a failed read fails only its row, whatever order the reads finish in."""
    gone = str(tmp_path / "gone.jpg")
    ids = ["obama", "gone", "biden", "notimage", "scene", "obama2"]
    uris = [
        scheme + os.path.abspath(u)
        for u in (inputs["obama"], gone, inputs["biden"], inputs["notimage"], inputs["scene"], inputs["obama"])
    ]
    out = LoadStage(config.io)(prepare_rows(pd.DataFrame({"image_id": ids, "image_uri": uris}), None)).to_pandas()
    assert out["image_id"].tolist() == ids
    assert out["status"].tolist() == ["ok", "missing", "ok", "decode_error", "ok", "ok"]
    one_by_one = {k: LoadStage(config.io)(prepare_rows(pd.DataFrame({"image_id": [k], "image_uri": [u]}), None))
                  .to_pandas().iloc[0] for k, u in zip(ids, uris)}  # fmt: skip
    for _, row in out.iterrows():
        alone = one_by_one[row["image_id"]]
        assert row["status"] == alone["status"]
        if row["status"] == "ok":
            assert row["pixels"] == alone["pixels"] and row["width"] == alone["width"]
        else:
            assert row["error"].split(" at 0x")[0] == alone["error"].split(" at 0x")[0]  # PIL names a BytesIO
            assert not isinstance(row["pixels"], bytes) and not isinstance(alone["pixels"], bytes)
    assert out.set_index("image_id").at["obama", "pixels"] == out.set_index("image_id").at["obama2", "pixels"]
    assert out.set_index("image_id").at["obama", "pixels"] != out.set_index("image_id").at["biden", "pixels"]


def test_the_fused_actor_encodes_and_parses_no_json_between_its_stages(batch, config, tmp_path, monkeypatch):
    """Inside one actor the faces stay Python records from the face stage to the write stage: no JSON encode or
    parse per row and stage (they cost more than the rest of the per-row bookkeeping at 32 px)."""
    import pipelines.stages as stages

    calls = {"dumps": 0, "loads": 0}

    class CountingJSON:
        def dumps(self, *a, **k):
            calls["dumps"] += 1
            return json.dumps(*a, **k)

        def loads(self, *a, **k):
            calls["loads"] += 1
            return json.loads(*a, **k)

    stage = FusedCPUStage([(s.cls, s.kwargs) for s in stylize_chain(config, str(tmp_path), key_suffix="")])
    monkeypatch.setattr(stages, "json", CountingJSON())
    out = stage(batch).to_pandas()
    assert calls == {"dumps": 0, "loads": 0}
    assert [len(v) for v in out[FACE_ROWS]] == [1, 0, 0, 0, 0] and out[FACE_ROWS][0][0]["id_sim"] is not None


def test_the_learned_style_judge_can_be_turned_off(staged, config):
    """``score.style_distance: false`` (the null config's: it is model work) leaves the learned columns null and
    every other figure as it was."""
    off = JobConfig.from_dict({"faces": {"upsample": 1}, "score": {"redetect": True, "style_distance": False}})
    assert off.config_hash() != config.config_hash()  # what is scored changed: an output knows which it has
    scored = ScoreStage(off.faces, off.score, off.io)(staged["stylize"]).to_pandas().set_index("image_id")
    on = staged["score"].set_index("image_id")
    assert on.at["good", "style_distance"] > 0 and on.at["good", "style_distance_source"] > 0
    for column in ("style_distance", "style_distance_source", "style_distance_no_mosaic"):
        assert pd.isna(scored.at["good", column]), column
    for column in ("colour_distance", "content_ssim", "id_sim_mean", "status"):
        assert scored.at["good", column] == on.at["good", column], column

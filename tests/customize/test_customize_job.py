"""``stylid customize`` end to end inside Ray Data on the tiny FaceSnap model: images, metrics and face shards,
error rows, rerun and resume from the ``metrics/`` ledger, and the config guard.

One job runs per module (``finished``); the other tests rerun it (or a copy of it) and stay short.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipelines.customize
import pipelines.stages
from stylid_core.config import ConfigError
from stylid_core.customize.base import CUSTOMIZERS
from stylid_core.imageio import decode_image, encode_png
from stylid_core.metrics import METRICS_VERSION

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "customize_tiny.yaml")
EXPECTED = {"a": "ok", "b": "ok", "c": "no_face", "d": "missing", "e": "decode_error"}
FACE_COLUMNS = ["image_id", "gen_index", "detected", "id_sim", "id_dist", "id_match", "backend"]


def _metrics(output: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{output}/metrics/part-*.parquet"))])


def _faces(output: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{output}/faces/part-*.parquet"))])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, astronaut) -> str:
    d = tmp_path_factory.mktemp("customize-inputs")
    ref = d / "ref.png"
    ref.write_bytes(encode_png(astronaut))
    pose = d / "pose.png"
    pose.write_bytes(encode_png(np.ascontiguousarray(astronaut[:, ::-1])))
    blank = d / "blank.png"
    blank.write_bytes(encode_png(np.full((64, 64, 3), 200, np.uint8)))
    (d / "bad.png").write_bytes(b"not an image")
    rows = [
        {"image_id": "a", "reference_uri": str(ref), "prompt": "an oil painting", "pose_uri": str(pose),
         "num_images": 2},
        {"image_id": "b", "reference_uri": str(ref), "prompt": "a sketch", "pose_uri": None, "num_images": None},
        {"image_id": "c", "reference_uri": str(blank), "prompt": "x", "pose_uri": None, "num_images": 1},
        {"image_id": "d", "reference_uri": str(d / "missing.png"), "prompt": "x", "pose_uri": None,
         "num_images": 1},
        {"image_id": "e", "reference_uri": str(d / "bad.png"), "prompt": "x", "pose_uri": None, "num_images": 1},
    ]  # fmt: skip
    path = d / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, manifest, ray_session) -> str:
    """A finished run through the CLI (a real local Ray: 20-150 s on 2 shared cores)."""
    from jobs.cli import main

    out = str(tmp_path_factory.mktemp("customize-out") / "out")
    assert main(["customize", "--config", CONFIG, "--manifest", manifest, "--output", f"file://{out}"]) == 0
    return out


@pytest.fixture
def config():
    from jobs.config import load_config

    return load_config("customize", CONFIG)


@pytest.mark.slow
def test_customize_job_writes_images_metrics_and_faces(finished):
    out = finished
    metrics = _metrics(out).set_index("image_id")
    assert sorted(metrics.index) == sorted(EXPECTED)  # every row exactly once
    assert metrics["status"].to_dict() == EXPECTED
    assert metrics.loc["a", "n_generated"] == 2 and metrics.loc["b", "n_generated"] == 1
    uris = json.loads(metrics.loc["a", "output_uris"])
    assert len(uris) == 2
    for uri in uris:
        img = decode_image(open(os.path.join(out, "images", uri.rsplit("/", 1)[1]), "rb").read())
        assert img.shape == (32, 32, 3)
    # a 32 px image of random weights has no recognisable face: counted as a miss, not an error
    assert metrics.loc["a", "id_match_rate"] == 0.0
    assert metrics.loc["a", "backend"] == "facesnap" and metrics.loc["a", "model"] == "tiny"
    # every metrics shard has its faces shard (same name)
    names = lambda sub: sorted(os.path.basename(p) for p in glob.glob(f"{out}/{sub}/part-*.parquet"))  # noqa: E731
    assert names("metrics") == names("faces")
    run = json.loads(open(f"{out}/run.json").read())
    assert run["counts"]["ok"] == 2 and run["rows"] == 5 and run["generated_images"] == 3
    assert run["this_run"]["processed"] == 5 and run["this_run"]["already_done"] == 0
    assert run["config_hash"] and "ray" in run["versions"] and run["config"]["io"]["storage_options"] == {}
    assert run["job"] == "customize" and run["metrics_version"] == METRICS_VERSION  # jobs.output's run.json
    assert run["started"] <= run["finished"]
    assert os.path.isfile(f"{out}/_SUCCESS")
    assert os.path.getmtime(f"{out}/_SUCCESS") >= os.path.getmtime(f"{out}/run.json")


@pytest.mark.slow
def test_faces_table_has_one_row_per_generated_image(finished):
    faces = _faces(finished)
    assert list(faces.columns) == FACE_COLUMNS
    assert sorted(zip(faces["image_id"], faces["gen_index"])) == [("a", 0), ("a", 1), ("b", 0)]
    assert (faces["backend"] == "dlib").all()
    # not detected: no similarity, no match; detected: a cosine in [-1, 1] and a native distance
    assert (faces["id_sim"].isna() == ~faces["detected"]).all()
    assert not faces.loc[~faces["detected"], "id_match"].any()
    assert faces["id_sim"].dropna().between(-1, 1).all() and (faces["id_dist"].dropna() >= 0).all()


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_no_model_work(finished, manifest, config, monkeypatch):
    from jobs.customize import run_customize_job

    shards = {p: os.path.getmtime(p) for p in glob.glob(f"{finished}/*/part-*.parquet")}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run must build no dataset and construct no customizer")

    monkeypatch.setattr(pipelines.customize, "build_customize_dataset", no_work)
    monkeypatch.setattr(CUSTOMIZERS, "create", no_work)
    monkeypatch.setattr(pipelines.stages, "create_face_analyzer", no_work)  # the chain's FaceStage and ScoreStage
    info = run_customize_job(config, manifest, finished)
    assert info["this_run"]["processed"] == 0 and info["this_run"]["already_done"] == 5
    assert {p: os.path.getmtime(p) for p in glob.glob(f"{finished}/*/part-*.parquet")} == shards
    assert info["rows"] == 5 and os.path.isfile(f"{finished}/_SUCCESS")


@pytest.mark.slow
def test_resume_processes_exactly_the_missing_rows(finished, manifest, config, tmp_path):
    """A crash after a batch's images and face rows were stored but before its metrics shard: the rerun redoes
    exactly those rows, drops the orphan face shard, and every id and generated image is there once."""
    from jobs.customize import run_customize_job

    out = str(tmp_path / "resumed")
    shutil.copytree(finished, out)
    os.remove(f"{out}/_SUCCESS")
    lost = [p for p in glob.glob(f"{out}/metrics/part-*.parquet") if "a" in pq.read_table(p)["image_id"].to_pylist()]
    assert len(lost) == 1
    lost_ids = set(pq.read_table(lost[0])["image_id"].to_pylist())
    os.remove(lost[0])
    info = run_customize_job(config, manifest, out)
    assert info["this_run"]["processed"] == len(lost_ids)
    assert info["this_run"]["already_done"] == 5 - len(lost_ids)
    metrics = _metrics(out)
    assert metrics["image_id"].is_unique and dict(zip(metrics["image_id"], metrics["status"])) == EXPECTED
    faces = _faces(out)
    assert not faces.duplicated(["image_id", "gen_index"]).any(), "resume duplicated face rows"
    assert sorted(zip(faces["image_id"], faces["gen_index"])) == [("a", 0), ("a", 1), ("b", 0)]
    assert info["counts"] == {"ok": 2, "no_face": 1, "missing": 1, "decode_error": 1}
    assert os.path.isfile(f"{out}/_SUCCESS")


@pytest.mark.slow
def test_another_config_into_the_same_output_needs_overwrite(finished, config, tmp_path):
    from jobs.customize import run_customize_job

    out = str(tmp_path / "other")
    shutil.copytree(finished, out)
    other = type(config).from_dict({**config.to_dict(), "default_num_images": 2})
    assert other.config_hash() != config.config_hash()
    empty = str(tmp_path / "empty.parquet")  # no rows: the guard is what is tested, not another model run
    pd.DataFrame({"image_id": pd.Series([], dtype=str), "reference_uri": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(ConfigError, match="another config"):
        run_customize_job(other, empty, out)
    assert os.path.isfile(f"{out}/_SUCCESS") and glob.glob(f"{out}/metrics/part-*.parquet")  # untouched
    info = run_customize_job(other, empty, out, overwrite=True)
    assert info["config_hash"] == other.config_hash() and info["rows"] == 0
    assert not glob.glob(f"{out}/metrics/part-*.parquet") and not glob.glob(f"{out}/faces/part-*.parquet")
    assert json.loads(open(f"{out}/run.json").read())["config_hash"] == other.config_hash()


def read_customize_manifest(manifest_uri, config) -> pd.DataFrame:
    """The whole prepared manifest as the job reads it: ids checked (``scan_ids``, as preflight and the plan do),
    then ``iter_customize_manifest``'s batches as one frame."""
    import pyarrow as pa

    from pipelines.customize import iter_customize_manifest

    reader = iter_customize_manifest(manifest_uri, config)
    reader.scan_ids()
    return pa.concat_tables(list(reader), promote_options="permissive").to_pandas()


def test_manifest_errors_raise_before_any_work(config, tmp_path):
    dup = str(tmp_path / "dup.parquet")
    pd.DataFrame({"image_id": ["x", "x"], "reference_uri": ["r1", "r2"]}).to_parquet(dup)
    with pytest.raises(ValueError, match="duplicate image_id"):
        read_customize_manifest(dup, config)
    nocol = str(tmp_path / "nocol.parquet")
    pd.DataFrame({"image_uri": ["r1"]}).to_parquet(nocol)
    with pytest.raises(ValueError, match="no 'reference_uri' column"):
        read_customize_manifest(nocol, config)
    rows = str(tmp_path / "rows.parquet")
    pd.DataFrame({"reference_uri": ["r1", None], "prompt": ["p", None]}).to_parquet(rows)
    df = read_customize_manifest(rows, config)
    assert df["image_id"].is_unique and list(df["status"]) == ["ok", "missing"]


def test_the_manifest_streams_in_batches_into_the_plan_like_stylid_runs(config, tmp_path):
    """``stylid customize`` reads its manifest as ``stylid run`` does (pyarrow batches, each prepared; the plan
    keeps the pending rows only): the same rows as a whole read, duplicates found across batches."""
    from pipelines.customize import iter_customize_manifest
    from pipelines.plan import plan_pending
    from tests.pending import plan_rows

    prefix = tmp_path / "manifest"
    prefix.mkdir()
    pd.DataFrame({"reference_uri": ["r1", "r2", "r3"], "prompt": ["a", "b", None],
                  "pose_uri": [None, None, None]}).to_parquet(prefix / "part-0.parquet")  # fmt: skip
    pd.DataFrame({"image_id": ["x", "y"], "reference_uri": ["r4", ""], "prompt": ["c", "d"],
                  "pose_uri": ["p4", None], "num_images": [2, 99]}).to_parquet(prefix / "part-1.parquet")  # fmt: skip
    whole = read_customize_manifest(str(prefix), config)
    reader = iter_customize_manifest(str(prefix), config, batch_rows=2)
    assert [t.num_rows for t in reader] == [2, 1, 2]  # batches, not the whole manifest
    done, pending = plan_rows(reader, str(tmp_path / "out"))
    assert len(done) == 0
    got = pending.to_pandas()
    assert got["image_id"].tolist() == whole["image_id"].tolist() and got["image_id"].is_unique
    assert got["status"].tolist() == ["ok", "ok", "ok", "ok", "missing"]
    assert got["pose_uri"].tolist()[3] == "p4" and got["num_images"].tolist()[3:] == [2, config.max_num_images]
    pd.DataFrame({"image_id": ["x"], "reference_uri": ["r9"]}).to_parquet(prefix / "part-2.parquet")
    with pytest.raises(ValueError, match="duplicate image_id"):
        plan_pending(
            iter_customize_manifest(str(prefix), config, batch_rows=2),
            str(tmp_path / "out"),
            {},
            block_rows=lambda n: 2,
        )


def test_the_plan_hands_the_dataset_its_pending_rows_in_ray_block_by_block(
    config, manifest, ray_session, tmp_path, monkeypatch
):
    """As ``stylid run``'s: the plan does not read the pending rows; ``build_customize_dataset`` gets
    ``PendingRows``, read by the dataset's own tasks in blocks of about ``input_block_rows`` after the reference
    stage's batches, never a table held by the driver, and the rows already in the ledger are not among them."""
    import pyarrow as pa
    import ray

    from pipelines.customize import run_customize
    from pipelines.plan import PendingRows, input_block_rows
    from stylid_core.ledger import ShardWriter

    out = str(tmp_path / "out")
    writer = ShardWriter(out, {}, rows_per_shard=10)
    writer.add(pa.table({"image_id": ["b"], "status": ["ok"]}))
    writer.flush()
    built = []

    def build(cfg, rows, output_uri, shard_writers=None):
        built.append(rows)
        return rows.dataset().select_columns(["image_id", "status"])

    monkeypatch.setattr(pipelines.customize, "build_customize_dataset", build)
    result = run_customize(config, manifest, out)
    (rows,) = built
    assert isinstance(rows, PendingRows) and len(rows) == 4
    per_block = input_block_rows(4, config.resources.reference.batch_size, ray.cluster_resources()["CPU"])
    assert rows.block_rows == per_block
    tables = list(rows.dataset().iter_batches(batch_format="pyarrow", batch_size=None))
    assert all(t.num_rows <= per_block for t in tables) and sum(t.num_rows for t in tables) == 4
    whole = read_customize_manifest(manifest, config)
    pending = pa.concat_tables(tables).to_pandas()
    assert pending["image_id"].tolist() == [i for i in whole["image_id"] if i != "b"]
    assert pending["status"].tolist() == whole.loc[whole["image_id"] != "b", "status"].tolist()
    assert (result.total_rows, result.already_done, result.processed) == (5, 1, 4)


def test_score_stage_rows_per_generated_image(config, astronaut, astronaut_face):
    """The reference itself as a 'generated' image: detected, cosine ~1, a match; a blank one: a miss."""
    from pipelines.customize import customize_chain

    d = astronaut_face.to_dict()
    images = [astronaut, np.full((64, 64, 3), 200, np.uint8)]
    row = {"image_id": "a", "status": "ok", "prompt": "p", "faces_json": json.dumps([d]),
           "gen_pixels": [im.tobytes() for im in images], "gen_height": [im.shape[0] for im in images],
           "gen_width": [im.shape[1] for im in images]}  # fmt: skip
    df = customize_chain(config)[3].make()(pd.DataFrame([row])).to_pandas()  # ScoreStage, k images a row
    gens = json.loads(df.at[0, "gen_json"])
    assert [g["gen_index"] for g in gens] == [0, 1] and {g["backend"] for g in gens} == {"dlib"}
    assert gens[0]["detected"] and gens[0]["id_sim"] > 0.95 and gens[0]["id_match"] and 0 <= gens[0]["id_dist"] < 0.6
    assert not gens[1]["detected"] and gens[1]["id_sim"] is None and gens[1]["id_match"] is False
    assert df.at[0, "n_generated"] == 2 and df.at[0, "n_faces_found"] == 1 and df.at[0, "id_match_rate"] == 0.5


def test_pools_that_cannot_fit_the_cluster_are_refused_up_front(config, manifest, ray_session, tmp_path):
    """A generate pool asking for a GPU on a CPU-only Ray, or pools wider than the CPUs, would make the stream wait
    forever: building the dataset raises a ConfigError naming the pool instead (before any stage starts)."""
    from pipelines.customize import build_customize_dataset, check_customize_fits, iter_customize_manifest
    from stylid_core.customize.job_config import CustomizeJobConfig

    check_customize_fits(config, cpus=2, gpus=0)  # the tiny config fits a 2-core machine
    base = config.to_dict()

    def changed(stage: str, **kw) -> CustomizeJobConfig:
        res = base["resources"]
        return CustomizeJobConfig.from_dict({**base, "resources": {**res, stage: {**res[stage], **kw}}})

    on_gpu = changed("generate", num_gpus=1)
    check_customize_fits(on_gpu, cpus=2, gpus=1)
    with pytest.raises(ConfigError, match=r"1 GPU\(s\).*generate: 0.25 CPU \+ 1 GPU x 1.*has 2 CPU\(s\) and 0 GPU"):
        check_customize_fits(on_gpu, cpus=2, gpus=0)
    wide = changed("reference", pool_size=8)
    # the reference pool (FaceStage's), the generate and score pools, a load and a write task (0.1 CPU each)
    with pytest.raises(ConfigError, match=r"need 2.7 CPU\(s\).*reference: 0.25 CPU x 8"):
        check_customize_fits(wide, cpus=2, gpus=0)
    # the dataset checks against the running Ray's resources (2 CPUs, no GPU here)
    from pipelines.plan import plan_pending

    _, rows = plan_pending(
        iter_customize_manifest(manifest, on_gpu), str(tmp_path / "plan"), {}, block_rows=lambda n: 2
    )
    with pytest.raises(ConfigError, match="generate"):
        build_customize_dataset(on_gpu, rows, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="reference"):
        build_customize_dataset(wide, rows, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

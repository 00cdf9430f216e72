"""The whole job end to end on a real local Ray, local paths, the embedded default models."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipelines.stylize
from jobs.run import run_job
from pipelines.chain import build_chain, fusion_of
from pipelines.schema import FACE_COLUMNS, METRICS_COLUMNS
from pipelines.stylize import stylize_chain
from stylid_core.config import ConfigError, JobConfig
from tests.pipelines.conftest import write_manifest
from tests.pipelines.netcheck import ListenerWatch

EXPECTED = {"obama": "ok", "biden": "ok", "scene": "ok", "noface": "no_face", "notimage": "decode_error",
            "gone": "missing"}  # fmt: skip


def _rows(inputs, tmp):
    rows = [{"image_id": k, "image_uri": inputs[k]} for k in ("obama", "biden", "scene", "noface", "notimage")]
    rows.append({"image_id": "gone", "image_uri": str(tmp / "no_such_file.jpg")})
    return rows


def _metrics(output) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted(glob.glob(f"{output}/metrics/part-*.parquet"))])


def _faces(output) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted(glob.glob(f"{output}/faces/part-*.parquet"))])


@pytest.fixture(scope="module")
def manifest(inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    return write_manifest(str(tmp / "manifest.parquet"), _rows(inputs, tmp))


@pytest.fixture(scope="module")
def finished(ray_session, manifest, tmp_path_factory):
    """One complete run with the default config; the Ray processes' listening sockets watched while it runs."""
    output = str(tmp_path_factory.mktemp("out") / "run")
    with ListenerWatch() as watch:  # shards of 2 rows (the layout, not the config's identity: still the default)
        info = run_job(JobConfig.from_dict({"io": {"rows_per_shard": 2}}), output, manifest)
    return output, info, watch


def test_every_ray_listener_is_on_loopback(finished):
    _, _, watch = finished
    assert watch.seen, "no listening socket of a Ray process was observed"
    bad = watch.not_loopback()
    assert not bad, f"Ray processes listening beyond 127.0.0.1 (pid, name, address, port): {bad}"


def test_every_manifest_id_appears_exactly_once_with_its_status(finished):
    output, info, _ = finished
    metrics = _metrics(output)
    assert sorted(metrics["image_id"]) == sorted(EXPECTED)
    assert metrics["image_id"].is_unique
    assert dict(zip(metrics["image_id"], metrics["status"])) == EXPECTED
    assert list(metrics.columns) == METRICS_COLUMNS
    assert info["this_run"]["processed"] == len(EXPECTED) and info["this_run"]["already_done"] == 0
    assert info["this_run"]["status_counts"] == {"ok": 3, "no_face": 1, "decode_error": 1, "missing": 1}
    assert info["summary"]["rows"] == len(EXPECTED)


def test_images_faces_run_json_success_and_report_are_written(finished):
    output, info, _ = finished
    images = sorted(os.listdir(f"{output}/images"))
    assert images == ["biden.png", "obama.png", "scene.png"]  # default config: no hash suffix, ok rows only
    metrics = _metrics(output).set_index("image_id")
    assert metrics.at["scene", "output_uri"] == os.path.join(output, "images", "scene.png")
    assert pd.isna(metrics.at["noface", "output_uri"])
    faces = _faces(output)
    assert list(faces.columns) == list(FACE_COLUMNS)
    counts = faces.groupby("image_id").size().to_dict()
    assert counts == {k: int(metrics.at[k, "n_faces"]) for k in ("obama", "biden", "scene")}
    assert counts["scene"] == 2 and faces["backend"].eq("dlib").all()
    assert not faces.duplicated(["image_id", "face_index"]).any()
    with open(f"{output}/run.json") as f:
        run = json.load(f)
    assert run["config_hash"] == JobConfig().config_hash() and run["is_default_config"] is True
    assert run["this_run"]["processed"] == len(EXPECTED)
    assert os.path.isfile(f"{output}/_SUCCESS")
    with open(f"{output}/report.html") as f:
        report = f.read()
    assert "<html" in report.lower() and "scene" in report


def test_rerun_of_a_finished_run_does_no_work(finished, manifest, monkeypatch):
    output, _, _ = finished
    done = sorted(glob.glob(f"{output}/metrics/part-*.parquet"))

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run must not build a dataset (and load no model)")

    monkeypatch.setattr(pipelines.stylize, "build_chain", no_work)
    monkeypatch.setattr("pipelines.stages.create_face_analyzer", no_work)
    info = run_job(JobConfig(), output, manifest)
    assert info["this_run"]["processed"] == 0
    assert info["this_run"]["already_done"] == len(EXPECTED)
    assert sorted(glob.glob(f"{output}/metrics/part-*.parquet")) == done
    assert os.path.isfile(f"{output}/_SUCCESS")


@pytest.mark.parametrize(
    "resources",
    [{}, {"fused": {"batch_size": 1}}, {"fuse_io": False, "write": {"batch_size": 1}}],
    ids=["same-batches", "other-batches", "other-batches-io-apart"],
)
def test_resume_processes_exactly_the_missing_rows(finished, manifest, tmp_path, resources):
    """A crash after a shard's images and face rows were written but before its metrics shard: the rerun redoes
    those rows, also when they are batched differently or written by separate write tasks (resources are not
    part of the config's identity), and the orphaned faces shard is not counted twice."""
    config = JobConfig.from_dict({"resources": resources, "io": {"rows_per_shard": 2}})
    output = str(tmp_path / "resumed")
    shutil.copytree(finished[0], output)
    os.remove(f"{output}/_SUCCESS")
    shards = sorted(glob.glob(f"{output}/metrics/part-*.parquet"))
    assert len(shards) >= 2
    # as if the run crashed before writing these shards (their images and face rows may already be there)
    # the shard holding the scene (rows with faces, so its face rows are on storage already)
    lost = [s for s in shards if "scene" in pq.read_table(s).column("image_id").to_pylist()]
    lost_ids = set()
    for shard in lost:
        lost_ids |= set(pq.read_table(shard).column("image_id").to_pylist())
        os.remove(shard)
    info = run_job(config, output, manifest)
    assert info["this_run"]["processed"] == len(lost_ids)
    assert info["this_run"]["already_done"] == len(EXPECTED) - len(lost_ids)
    metrics = _metrics(output)
    assert sorted(metrics["image_id"]) == sorted(EXPECTED) and metrics["image_id"].is_unique
    assert dict(zip(metrics["image_id"], metrics["status"])) == EXPECTED
    faces = _faces(output)
    assert not faces.duplicated(["image_id", "face_index"]).any(), "resume duplicated face rows"
    assert os.path.isfile(f"{output}/_SUCCESS")


def test_another_config_into_the_same_output_needs_overwrite(finished, inputs, tmp_path):
    output = str(tmp_path / "other")
    shutil.copytree(finished[0], output)
    small = write_manifest(str(tmp_path / "small.parquet"), [{"image_id": "biden", "image_uri": inputs["biden"]}])
    other = JobConfig.from_dict({"stylize": {"options": {"style_strength": 0.8}}, "score": {"redetect": False}})
    with pytest.raises(ConfigError, match="another config"):
        run_job(other, output, small)
    assert sorted(os.listdir(f"{output}/images")) == ["biden.png", "obama.png", "scene.png"]
    # resources are not part of the config's identity: same hash, no error, nothing to do
    same = JobConfig.from_dict({"resources": {"faces": {"batch_size": 1}}})
    assert run_job(same, output, small)["this_run"]["processed"] == 0
    with open(f"{output}/images/mine.txt", "w") as f:  # not the run's: --overwrite must leave it
        f.write("notes")
    info = run_job(other, output, small, overwrite=True)
    assert info["this_run"]["processed"] == 1 and info["this_run"]["already_done"] == 0
    metrics = _metrics(output)
    assert metrics["image_id"].tolist() == ["biden"]
    assert (metrics["config_hash"] == other.config_hash()).all()
    # the previous config's images are gone with its metrics; the copied-from output is untouched
    assert sorted(os.listdir(f"{output}/images")) == [f"biden-{other.config_hash()}.png", "mine.txt"]
    assert sorted(os.listdir(f"{finished[0]}/images")) == ["biden.png", "obama.png", "scene.png"]
    with open(f"{output}/run.json") as f:
        assert json.load(f)["config_hash"] == other.config_hash()


def _no_dataset(*args, **kwargs):
    raise AssertionError("work started")


def test_duplicate_image_ids_raise_before_any_work(ray_session, inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines.stylize, "build_chain", _no_dataset)
    manifest = write_manifest(
        str(tmp_path / "dupes.parquet"),
        [{"image_id": "a", "image_uri": inputs["obama"]}, {"image_id": "a", "image_uri": inputs["biden"]}],
    )
    with pytest.raises(ValueError, match="duplicate image_id"):
        run_job(JobConfig(), str(tmp_path / "out"), manifest)
    # a URI listed twice without ids derives the same id twice
    manifest = write_manifest(str(tmp_path / "dupes2.parquet"), [{"image_uri": inputs["obama"]}] * 2)
    with pytest.raises(ValueError, match="duplicate image_id"):
        run_job(JobConfig(), str(tmp_path / "out"), manifest)
    assert not os.path.exists(tmp_path / "out" / "metrics") and not os.path.exists(tmp_path / "out" / "run.json")


def test_manifest_without_image_uri_raises(ray_session, inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines.stylize, "build_chain", _no_dataset)
    manifest = write_manifest(str(tmp_path / "bad.parquet"), [{"image_id": "a", "path": inputs["obama"]}])
    with pytest.raises(ValueError, match="image_uri"):
        run_job(JobConfig(), str(tmp_path / "out"), manifest)
    with pytest.raises(ValueError, match="cannot read manifest"):
        run_job(JobConfig(), str(tmp_path / "out"), str(tmp_path / "nope.parquet"))
    assert not os.path.exists(tmp_path / "out" / "run.json")


def test_the_default_cpu_job_is_one_operator_and_io_apart_adds_load_and_write(ray_session, manifest, tmp_path):
    from pipelines.manifest import ManifestReader
    from pipelines.plan import plan_pending

    _, rows = plan_pending(ManifestReader(manifest, None), str(tmp_path / "out"), {}, block_rows=lambda n: 2)
    one = _dataset(JobConfig(), rows, str(tmp_path / "a"))
    apart = JobConfig.from_dict({"resources": {"fuse_io": False}})
    three = _dataset(apart, rows, str(tmp_path / "b"))
    ops = lambda ds: [line.split("(")[1].rstrip(")") for line in str(ds).splitlines() if "MapBatches(" in line]  # noqa: E731
    assert ops(one) == ["FusedCPUStage"]
    assert ops(three) == ["WriteStage", "FusedCPUStage", "LoadStage"]
    split = JobConfig.from_dict({"resources": {"fuse_cpu_stages": False}})
    assert ops(_dataset(split, rows, str(tmp_path / "c"))) == [
        "WriteStage",
        "ScoreStage",
        "StylizeStage",
        "FaceStage",
        "LoadStage",
    ]


def test_the_fused_job_reads_its_own_rows_from_the_manifest(ray_session, manifest, tmp_path):
    """Given a plan's pending rows not read yet (``PendingRows``), the default CPU job's dataset is made of their
    pieces, a few hundred bytes each, and the fused actors read the rows themselves: no read task, no block of
    rows in the object store. Kept apart (``fuse_io`` false), the rows are read by read tasks as before."""
    from pipelines.manifest import ManifestReader
    from pipelines.plan import PIECE_SCHEMA, plan_pending

    _, rows = plan_pending(ManifestReader(manifest, None), str(tmp_path / "out"), {}, block_rows=lambda n: 2)
    one = _dataset(JobConfig(), rows, str(tmp_path / "a"))
    assert str(one).startswith("MapBatches(FusedCPUStage)") and _source(one) == "FromArrow"
    pieces = rows.pieces_dataset()
    assert pieces.schema().base_schema.equals(PIECE_SCHEMA) and pieces.count() == -(-len(rows) // 2)
    apart = _dataset(JobConfig.from_dict({"resources": {"fuse_io": False}}), rows, str(tmp_path / "b"))
    assert _source(apart) == "Read"


def _dataset(config: JobConfig, rows, output_uri: str):
    """``stylid run``'s dataset of ``rows``, as ``run_stylize`` builds it."""
    return build_chain(rows, stylize_chain(config, output_uri), fusion_of(config.resources))


def _source(ds) -> str:
    """The kind of a dataset's first operator (``Read``, ``FromArrow``, ...)."""
    op = ds._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    return type(op).__name__

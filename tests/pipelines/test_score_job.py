"""``stylid score`` end to end on a real local Ray: a ``stylid run`` output rescored exactly, resume, per-row errors,
resized outputs, identity references, ids on one side only, refused baselines, S3."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipelines.score
from jobs.cli import main as cli
from jobs.config import load_score_config
from jobs.score import run_score_job
from pipelines.schema import FACE_COLUMNS, METRICS_COLUMNS
from pipelines.score import iter_score_manifest
from stylid_core.sample_data import background, build_scene, load_photo
from tests.pipelines.score_inputs import LAYOUTS, RUN_STATUS, read_output_image, score_input
from tests.stored_rows import stored_rows

#: the identity figures of a face row (the no-mosaic counterfactual needs a stylization, which scoring never does)
IDENTITY = ["image_id", "face_index", "x0", "y0", "x1", "y1", "det_score", "size_px", "size_bucket", "id_sim",
            "id_dist", "id_match", "redetected", "backend"]  # fmt: skip
PER_IMAGE = ["status", "id_sim_mean", "id_sim_min", "id_match_rate", "n_redetected", "colour_distance",
             "colour_distance_source", "content_ssim", "image_uri", "style_uri", "n_faces", "engine",
             "model"]  # fmt: skip


def _tables(output: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    metrics = stored_rows(os.path.join(output, "metrics")).sort_values("image_id").reset_index(drop=True)
    faces = stored_rows(os.path.join(output, "faces"))
    return metrics, faces.sort_values(["image_id", "face_index"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def rescored(score_run, tmp_path_factory):
    """``stylid score`` of the run's output folder, with that run as the baseline (the CLI, in process)."""
    output = str(tmp_path_factory.mktemp("rescored") / "scores")
    rc = cli(["score", "--manifest", score_run["output"], "--output", output, "--baseline", score_run["output"],
              "--set", "gate.min_faces=3"])  # fmt: skip
    return rc, output


def test_score_of_a_run_output_reproduces_its_identity_figures_exactly(score_run, rescored):
    rc, output = rescored
    run_metrics, run_faces = _tables(score_run["output"])
    metrics, faces = _tables(output)
    assert list(metrics.columns) == METRICS_COLUMNS and list(faces.columns) == list(FACE_COLUMNS)
    assert dict(zip(metrics["image_id"], metrics["status"])) == RUN_STATUS
    assert len(faces) == 9
    pd.testing.assert_frame_equal(faces[IDENTITY], run_faces[IDENTITY])
    ok = metrics["status"] == "ok"  # rows that failed in the run were not scored again: they keep its status
    pd.testing.assert_frame_equal(metrics.loc[ok, PER_IMAGE], run_metrics.loc[ok, PER_IMAGE])
    # the outputs scored are the run's images; no image is written; nothing claims a counterfactual
    assert list(metrics["output_uri"]) == list(run_metrics["output_uri"])
    assert not os.path.exists(os.path.join(output, "images"))
    assert faces["id_sim_no_mosaic"].isna().all() and metrics["id_sim_mean_no_mosaic"].isna().all()
    assert faces["in_mosaic"].isna().all()  # whether a face went through the mosaic: only the run knows
    failed = metrics.set_index("image_id")
    assert failed.at["noface", "error"].startswith("not scored: no face")
    with open(os.path.join(output, "run.json")) as f:
        run = json.load(f)
    assert run["job"] == "score" and run["this_run"]["processed"] == 5
    assert run["config_hash"] == load_score_config("nightly_score")[0].config_hash()
    assert run["gate"]["passed"] is True
    assert os.path.isfile(os.path.join(output, "_SUCCESS")) and os.path.isfile(os.path.join(output, "report.html"))


def test_an_unchanged_rescore_passes_the_gate(rescored, capsys):
    rc, output = rescored
    assert rc == 0
    with open(os.path.join(output, "gate.json")) as f:
        gate = json.load(f)
    assert gate["passed"] and gate["failures"] == [] and gate["shared_ids"] == 5 and gate["faces_paired"] == 9
    assert gate["only_in_baseline"] == [] and gate["only_in_candidate"] == [] and gate["status_worse"] == []
    assert all(c["diff"] == 0 for c in gate["checks"] if c["diff"] is not None)
    assert {c["bucket"] for c in gate["checks"]} == {"48-64", "64-128", "all"}
    assert gate["thresholds"]["min_faces"] == 3 and "Student-t" in gate["interval"]


def test_a_finished_score_does_no_model_work_on_rerun(score_run, rescored, monkeypatch):
    _, output = rescored

    def no_work(*args, **kwargs):
        raise AssertionError("a finished score must not build a dataset (and load no model)")

    monkeypatch.setattr(pipelines.score, "build_chain", no_work)
    monkeypatch.setattr("pipelines.stages.create_face_analyzer", no_work)
    config, gate = load_score_config("nightly_score")
    info = run_score_job(config, gate, score_run["output"], output, report=False)
    assert info["this_run"]["processed"] == 0 and info["this_run"]["already_done"] == 5
    assert not os.path.exists(os.path.join(output, "gate.json"))  # no baseline this time: no stale verdict
    assert os.path.isfile(os.path.join(output, "_SUCCESS"))


def test_a_crashed_score_resumes_with_exactly_the_missing_rows(score_run, rescored, tmp_path):
    output = str(tmp_path / "crashed")
    shutil.copytree(rescored[1], output)
    os.remove(os.path.join(output, "_SUCCESS"))
    shards = sorted(os.listdir(os.path.join(output, "metrics")))
    lost = pd.read_parquet(os.path.join(output, "metrics", shards[0]))["image_id"].tolist()
    os.remove(os.path.join(output, "metrics", shards[0]))  # as if the crash came before this shard's ledger write
    config, gate = load_score_config("nightly_score")
    info = run_score_job(config, gate, score_run["output"], output, report=False)
    assert info["this_run"]["processed"] == len(lost) and info["this_run"]["already_done"] == 5 - len(lost)
    metrics, faces = _tables(output)
    assert sorted(metrics["image_id"]) == sorted(RUN_STATUS) and metrics["image_id"].is_unique
    assert not faces.duplicated(["image_id", "face_index"]).any() and len(faces) == 9
    assert os.path.isfile(os.path.join(output, "_SUCCESS"))


@pytest.fixture(scope="module")
def pairs(score_run, tmp_path_factory):
    """A manifest of pairs made outside stylid: two unchanged outputs, a resized one, a reframed one, broken and
    missing outputs, and identity references; scored through the CLI with the run as the baseline."""
    d = tmp_path_factory.mktemp("pairs")
    run_metrics = stored_rows(os.path.join(score_run["output"], "metrics")).set_index("image_id")
    src = {k: run_metrics.at[k, "image_uri"] for k in ("a", "b", "c")}
    out = {k: run_metrics.at[k, "output_uri"] for k in ("a", "b", "c")}
    a = read_output_image(out["a"])
    h, w = a.shape[:2]
    Image.fromarray(np.asarray(Image.fromarray(a).resize((w // 2, h // 2), Image.LANCZOS))).save(d / "a-half.png")
    Image.fromarray(np.asarray(Image.fromarray(a).resize((w * 2, h), Image.LANCZOS))).save(d / "a-wide.png")
    (d / "broken.png").write_bytes(b"not a png at all" * 10)
    for person in ("obama", "biden"):
        portrait = Image.fromarray(load_photo(person))
        scale = 240 / max(portrait.size)
        portrait.resize((round(portrait.width * scale), round(portrait.height * scale))).save(d / f"{person}.jpg")
    Image.fromarray(background(200, 150)).save(d / "empty.png")
    # a customization-like output with biden as its largest face: scene a's three faces are all 56 px, so which one
    # dlib finds largest in the stylized scene is a matter of a few pixels; cut out biden's part of the scene instead
    _, placed = build_scene(LAYOUTS["a"])
    x0, y0, x1, y1 = next(p.box for p in placed if p.stem == "biden")
    margin = 1.5 * (x1 - x0)  # the scene's full height and 1.5 face widths each side: biden's slot, no neighbour
    cut = np.ascontiguousarray(a[:, max(0, round(x0 - margin)) : round(x1 + margin)])
    Image.fromarray(cut).save(d / "biden-cut.png")
    rows = [
        {"image_id": "a", "source_uri": src["a"], "output_uri": out["a"]},
        {"image_id": "b", "source_uri": src["b"], "output_uri": out["b"]},
        {"image_id": "a-half", "source_uri": src["a"], "output_uri": str(d / "a-half.png")},
        {"image_id": "a-wide", "source_uri": src["a"], "output_uri": str(d / "a-wide.png")},
        {"image_id": "broken", "source_uri": src["b"], "output_uri": str(d / "broken.png")},
        {"image_id": "lost", "source_uri": src["b"], "output_uri": str(d / "not-there.png")},
        {"image_id": "none", "source_uri": src["b"], "output_uri": None},
        # customization-like outputs: the identity comes from the reference, found again wherever it is now
        {"image_id": "ref-found", "source_uri": str(d / "biden.jpg"), "output_uri": str(d / "biden-cut.png"),
         "reference_uri": str(d / "biden.jpg")},
        {"image_id": "ref-other", "source_uri": str(d / "obama.jpg"), "output_uri": str(d / "biden-cut.png"),
         "reference_uri": str(d / "obama.jpg")},
        {"image_id": "ref-none", "source_uri": str(d / "obama.jpg"), "output_uri": str(d / "empty.png"),
         "reference_uri": str(d / "obama.jpg")},
    ]  # fmt: skip
    manifest = str(d / "pairs.parquet")
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    output = str(d / "scores")
    rc = cli(["score", "--manifest", manifest, "--output", output, "--baseline", score_run["output"],
              "--set", "gate.min_faces=3"])  # fmt: skip
    return rc, output


def test_every_pair_appears_once_with_its_status_and_error(pairs):
    _, output = pairs
    metrics, _ = _tables(output)
    by_id = metrics.set_index("image_id")
    assert by_id["status"].to_dict() == {
        "a": "ok", "b": "ok", "a-half": "ok", "a-wide": "size_mismatch", "broken": "decode_error", "lost": "missing",
        "none": "missing", "ref-found": "ok", "ref-other": "ok", "ref-none": "ok",
    }  # fmt: skip
    assert "aspect ratio changed" in by_id.at["a-wide", "error"]
    assert by_id.at["broken", "error"].startswith("output_uri ") and "broken.png" in by_id.at["broken", "error"]
    assert "not-there.png" in by_id.at["lost", "error"] and by_id.at["none", "error"] == "empty output_uri"
    assert (by_id.loc[["a", "b"], "engine"] == "external").all()


def test_a_resized_output_is_scored_at_the_scaled_boxes(score_run, pairs):
    _, output = pairs
    _, faces = _tables(output)
    _, run_faces = _tables(score_run["output"])
    half = faces[faces["image_id"] == "a-half"].reset_index(drop=True)
    orig = run_faces[run_faces["image_id"] == "a"].reset_index(drop=True)
    assert len(half) == len(orig) == 3
    np.testing.assert_allclose(half[["x0", "y0", "x1", "y1"]], orig[["x0", "y0", "x1", "y1"]] / 2, atol=1.0)
    assert (half["size_bucket"] == "32-48").sum() + (half["size_bucket"] == "<32").sum() == 3  # output pixels
    # the same people where they are now (other people score about 0.6-0.7 with dlib); halved to 33-39 px, they lose
    # some identity, as any face shrunk to that size does
    assert half["id_sim"].min() > 0.85 and half["id_match"].sum() >= 2 and half["redetected"].all()
    # the unchanged pairs score exactly as in the run
    same = faces[faces["image_id"] == "a"].reset_index(drop=True)
    pd.testing.assert_frame_equal(same[IDENTITY], orig[IDENTITY])


def test_a_reference_is_scored_by_redetection(pairs):
    _, output = pairs
    metrics, faces = _tables(output)
    found = faces[faces["image_id"] == "ref-found"]
    assert len(found) == 1 and found["redetected"].all() and found["id_sim"].notna().all()
    assert found["id_match"].all()  # biden's reference against the face cut out of scene a: biden
    other = faces[faces["image_id"] == "ref-other"]  # obama's reference against biden: compared, and no match
    assert len(other) == 1 and other["redetected"].all() and not other["id_match"].any()
    assert other["id_sim"].iloc[0] < found["id_sim"].iloc[0] and other["id_dist"].iloc[0] > found["id_dist"].iloc[0]
    none = faces[faces["image_id"] == "ref-none"]
    assert len(none) == 1 and not none["redetected"].any() and not none["id_match"].any()
    assert none["id_sim"].isna().all()
    assert metrics.set_index("image_id").at["ref-none", "id_match_rate"] == 0.0


def test_ids_on_one_side_are_reported_and_fail_the_gate(pairs, capsys):
    rc, output = pairs
    assert rc == 1
    with open(os.path.join(output, "gate.json")) as f:
        gate = json.load(f)
    assert gate["only_in_baseline"] == ["c", "gone", "noface"]
    assert gate["only_in_candidate"] == ["a-half", "a-wide", "broken", "lost", "none", "ref-found", "ref-none",
                                         "ref-other"]  # fmt: skip
    assert gate["shared_ids"] == 2 and gate["status_worse"] == []
    assert gate["failures"] == ["only_in_baseline: 3 (at most 0)"]  # a and b themselves are unchanged


def _copy_run(score_run, path, edit=None) -> str:
    shutil.copytree(score_run["output"], path)
    if edit is not None:
        with open(os.path.join(path, "run.json")) as f:
            info = json.load(f)
        edit(info)
        with open(os.path.join(path, "run.json"), "w") as f:
            json.dump(info, f)
    return str(path)


def test_a_baseline_of_another_backend_or_config_is_refused_before_any_work(score_run, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("a refused baseline must cost no scoring")

    monkeypatch.setattr("jobs.score.init_ray", no_work)
    out = str(tmp_path / "scores")
    args = ["score", "--manifest", score_run["output"], "--output", out]
    assert cli([*args, "--baseline", score_run["output"], "--set", "faces.upsample=1"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "faces.upsample: 2 in the baseline, 1 here" in err

    def insightface(info):
        info["config"]["faces"]["backend"] = "insightface"

    other = _copy_run(score_run, tmp_path / "other-backend", insightface)
    assert cli([*args, "--baseline", other]) == 2
    assert "face backend 'insightface'" in capsys.readouterr().err
    unfinished = _copy_run(score_run, tmp_path / "unfinished")
    os.remove(os.path.join(unfinished, "_SUCCESS"))
    assert cli([*args, "--baseline", unfinished]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert cli([*args, "--baseline", str(tmp_path / "nowhere")]) == 2
    assert "no readable run.json" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_bad_manifests_are_refused(tmp_path):
    no_output = str(tmp_path / "no-output.parquet")
    pd.DataFrame({"source_uri": ["/a.png"]}).to_parquet(no_output)
    with pytest.raises(ValueError, match="no 'output_uri' column"):
        iter_score_manifest(no_output, None)
    dupes = str(tmp_path / "dupes.parquet")
    pd.DataFrame({"source_uri": ["/a.png", "/a.png"], "output_uri": ["/o.png", "/o.png"]}).to_parquet(dupes)
    with pytest.raises(ValueError, match="duplicate image_id"):
        iter_score_manifest(dupes, None).scan_ids()  # the plan's pass over the ids
    ok = str(tmp_path / "ok.parquet")
    pd.DataFrame({"source_uri": ["/a.png", "/a.png"], "output_uri": ["/o1.png", "/o2.png"]}).to_parquet(ok)
    rows = score_input(ok)
    assert rows["image_id"].nunique() == 2 and (rows["image_uri"] == "/a.png").all()


def test_a_moved_run_output_is_scored_where_it_is_now(score_run, tmp_path):
    moved = _copy_run(score_run, tmp_path / "moved")
    rows = score_input(moved).set_index("image_id")
    assert rows.at["a", "output_uri"] == os.path.join(moved, "images", os.path.basename(rows.at["a", "output_uri"]))
    assert rows.at["a", "status"] == "ok" and rows.at["noface", "status"] == "no_face"


def test_score_from_s3_to_s3(ray_session, s3_endpoint, score_run):
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="stylid-score")  # fmt: skip
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint, skip_instance_cache=True)
    run_metrics = stored_rows(os.path.join(score_run["output"], "metrics")).set_index("image_id")
    rows = []
    for image_id in ("a", "gone"):
        src, out = run_metrics.at[image_id, "image_uri"], run_metrics.at[image_id, "output_uri"]
        if os.path.exists(src):
            fs.put_file(src, f"stylid-score/in/{image_id}.png")
            fs.put_file(out, f"stylid-score/out/{image_id}.png")
        rows.append({"image_id": image_id, "source_uri": f"s3://stylid-score/in/{image_id}.png",
                     "output_uri": f"s3://stylid-score/out/{image_id}.png"})  # fmt: skip
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    fs.pipe_file("stylid-score/pairs.parquet", buf.getvalue())
    config, gate = load_score_config("nightly_score")
    info = run_score_job(config, gate, "s3://stylid-score/pairs.parquet", "s3://stylid-score/scores", report=False)
    assert info["this_run"]["status_counts"] == {"ok": 1, "missing": 1}
    assert fs.exists("stylid-score/scores/_SUCCESS") and fs.exists("stylid-score/scores/run.json")
    faces = pd.concat([pd.read_parquet(io.BytesIO(fs.cat_file(p))) for p in fs.ls("stylid-score/scores/faces")])
    _, run_faces = _tables(score_run["output"])
    expected = run_faces[run_faces["image_id"] == "a"].reset_index(drop=True)
    pd.testing.assert_frame_equal(faces.sort_values("face_index").reset_index(drop=True)[IDENTITY], expected[IDENTITY])


def test_the_unfused_chain_scores_the_same(score_run, tmp_path):
    """Faces and score as separate actor pools, load and write as tasks: the same figures as the fused pool."""
    config, gate = load_score_config("nightly_score", ["resources.fuse_cpu_stages=false"])
    output = str(tmp_path / "unfused")
    info = run_score_job(config, gate, score_run["output"], output, baseline_uri=score_run["output"], report=False)
    assert info["gate"]["passed"] and info["this_run"]["processed"] == 5
    _, faces = _tables(output)
    _, run_faces = _tables(score_run["output"])
    pd.testing.assert_frame_equal(faces[IDENTITY], run_faces[IDENTITY])


def test_a_customize_output_folder_becomes_one_pair_per_generated_image(tmp_path):
    folder = tmp_path / "cust"
    os.makedirs(folder / "metrics")
    (folder / "run.json").write_text(json.dumps({"job": "customize", "output": "s3://old/place/cust"}))
    pd.DataFrame([
        {"image_id": "p1", "reference_uri": "/refs/p1.jpg", "status": "ok", "error": None, "backend": "facesnap",
         "model": "m", "output_uris": json.dumps(["s3://old/place/cust/images/p1-h-0.png",
                                                  "s3://old/place/cust/images/p1-h-1.png"])},
        {"image_id": "p2", "reference_uri": "/refs/p2.jpg", "status": "no_face", "error": "no face in the reference",
         "backend": "facesnap", "model": "m", "output_uris": None},
    ]).to_parquet(folder / "metrics" / "part-1.parquet")  # fmt: skip
    rows = score_input(str(folder)).set_index("image_id")
    assert list(rows.index) == ["p1-0", "p1-1", "p2"]
    assert rows.at["p1-1", "output_uri"] == os.path.join(str(folder), "images", "p1-h-1.png")  # moved folder
    assert rows.at["p1-0", "reference_uri"] == rows.at["p1-0", "image_uri"] == "/refs/p1.jpg"
    assert rows.at["p2", "status"] == "no_face" and rows.at["p2", "error"] == "not scored: no face in the reference"

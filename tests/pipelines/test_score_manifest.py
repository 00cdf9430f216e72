"""``stylid score``'s input streamed the way ``stylid run``'s manifest is: a pairs manifest or a stylid output
folder read by ``ManifestReader`` in bounded batches (an output folder's live metrics shards only), each batch
prepared by ``score_rows``; duplicates refused across batches; the plan's pending rows handed to the dataset as
``PendingRows``, read as it runs."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pytest

import pipelines.score
from pipelines.plan import PendingRows, input_block_rows, plan_pending
from pipelines.resources import first_batch_rows
from pipelines.schema import derive_image_id
from pipelines.score import EXTERNAL_ENGINE, iter_score_manifest, run_score
from stylid_core.config import ScoreJobConfig
from stylid_core.ledger import ShardWriter, shard_name
from tests.pending import plan_rows
from tests.pipelines.score_inputs import score_input

STYLE = "/s/default.png"


def _prefix(path, frames: list[pd.DataFrame]) -> str:
    os.makedirs(path, exist_ok=True)
    for k, df in enumerate(frames):
        df.to_parquet(os.path.join(path, f"part-{k}.parquet"), index=False)
    return str(path)


def _ledger(output: str, ids: list[str], rows_per_shard: int = 100, **columns: list) -> list[str]:
    writer = ShardWriter(output, {}, rows_per_shard)
    writer.add(pa.table({"image_id": ids, **columns}))
    writer.flush()
    return writer.shards


def _pairs_prefix(tmp_path) -> str:
    return _prefix(tmp_path / "pairs", [
        pd.DataFrame({"image_id": ["a", "b", None], "source_uri": ["/in/a.png", "/in/b.png", "/in/c.png"],
                      "output_uri": ["/out/a.png", "/out/b.png", "/out/c.png"]}),
        # ids derived from both URIs; an empty source; style and reference columns in this file only
        pd.DataFrame({"source_uri": ["/in/d.png", "", "/in/d.png"], "output_uri": ["/out/d1.png", "/out/e.png",
                                                                                    "/out/d2.png"],
                      "style_uri": ["/s/d.png", None, None], "reference_uri": [None, None, "/ref/d.png"]}),
    ])  # fmt: skip


def test_a_pairs_manifest_read_in_small_batches_gives_the_rows_of_one_read(tmp_path):
    manifest = _pairs_prefix(tmp_path)
    small = iter_score_manifest(manifest, STYLE, batch_rows=2)
    tables = list(small)
    assert [t.num_rows for t in tables] == [2, 1, 2, 1]  # batches cut at the files: never the whole manifest
    whole = pa.concat_tables(list(iter_score_manifest(manifest, STYLE)), promote_options="permissive")
    assert pa.concat_tables(tables, promote_options="permissive").to_pylist() == whole.to_pylist()
    rows = score_input(manifest, STYLE)
    d1, e, d2 = (derive_image_id(f"{s}|{o}") for s, o in (("/in/d.png", "/out/d1.png"), ("", "/out/e.png"),
                                                          ("/in/d.png", "/out/d2.png")))  # fmt: skip
    c = derive_image_id("/in/c.png|/out/c.png")
    assert rows["image_id"].tolist() == ["a", "b", c, d1, e, d2]
    assert rows.columns.tolist() == ["image_id", "image_uri", "style_uri", "status", "error", "output_uri",
                                     "reference_uri", "engine", "model"]  # fmt: skip
    assert rows["image_uri"].tolist()[:2] == ["/in/a.png", "/in/b.png"]
    assert rows["style_uri"].tolist() == [STYLE, STYLE, STYLE, "/s/d.png", STYLE, STYLE]
    assert rows["status"].tolist() == ["ok", "ok", "ok", "ok", "missing", "ok"]
    assert rows["error"].tolist()[4] == "empty image_uri"
    assert rows["reference_uri"].tolist()[5] == "/ref/d.png" and rows["reference_uri"].isna().sum() == 5
    assert (rows["engine"] == EXTERNAL_ENGINE).all() and rows["model"].isna().all()


def test_duplicate_ids_across_batches_are_refused_naming_them(tmp_path):
    manifest = _prefix(tmp_path / "dupes", [
        pd.DataFrame({"image_id": ["x", "y"], "source_uri": ["/a", "/b"], "output_uri": ["/oa", "/ob"]}),
        pd.DataFrame({"image_id": ["z", "x"], "source_uri": ["/c", "/d"], "output_uri": ["/oc", "/od"]}),
        pd.DataFrame({"source_uri": ["/e", "/e"], "output_uri": ["/oe", "/oe"]}),  # the same pair twice
    ])  # fmt: skip
    twice = derive_image_id("/e|/oe")
    reader = iter_score_manifest(manifest, None, batch_rows=1)
    with pytest.raises(ValueError, match=rf"2 duplicate image_id\(s\).*'x'.*'{twice}'.*hash of source_uri"):
        plan_pending(reader, str(tmp_path / "out"), {}, block_rows=lambda n: 10)
    with pytest.raises(ValueError, match="duplicate image_id"):
        score_input(manifest)


def _run_output(folder: str, recorded: str, job: str = "run") -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"job": job, "output": recorded}, f)


def test_a_run_output_streams_over_its_live_metrics_shards_only(tmp_path):
    """Several shards, one batch a row; a shard replaced by a committed compaction is not read (its rows would be
    duplicates); URIs under the recorded output prefix are read where the folder is now; failed rows keep their
    status."""
    folder = str(tmp_path / "moved-run")
    _run_output(folder, "s3://old/run")
    ids = ["a", "b", "c", "d", "e"]
    shards = _ledger(
        folder, ids, rows_per_shard=2,
        image_uri=[f"/in/{i}.png" for i in ids],
        output_uri=[f"s3://old/run/images/{i}.png" for i in ids[:3]] + [None, "/elsewhere/e.png"],
        status=["ok", "ok", "ok", "no_face", "ok"], error=[None, None, None, "no face found", None],
        engine=["neural"] * 5, model=["m"] * 5,
    )  # fmt: skip
    assert len(shards) == 3
    # an old shard that a committed compaction replaced: readers skip it
    stale = shard_name(["a", "b"]).replace("part-", "part-stale")
    pd.DataFrame({"image_id": ["a", "b"], "image_uri": ["/x", "/y"], "output_uri": ["/ox", "/oy"],
                  "status": ["ok", "ok"]}).to_parquet(os.path.join(folder, "metrics", stale))  # fmt: skip
    with open(os.path.join(folder, "metrics", "_compaction-part-1.json"), "w") as f:
        json.dump({"shard": shards[0], "replaces": [stale]}, f)
    reader = iter_score_manifest(folder, STYLE, batch_rows=1)
    tables = list(reader)
    assert [t.num_rows for t in tables] == [1] * 5
    rows = score_input(folder, STYLE).set_index("image_id")
    assert sorted(rows.index) == ids
    assert rows.at["a", "output_uri"] == os.path.join(folder, "images", "a.png")
    assert rows.at["e", "output_uri"] == "/elsewhere/e.png" and rows.at["a", "image_uri"] == "/in/a.png"
    assert rows.at["d", "status"] == "no_face" and rows.at["d", "error"] == "not scored: no face found"
    assert (rows.drop(index="d")["status"] == "ok").all() and rows.drop(index="d")["error"].isna().all()
    assert (rows["engine"] == "neural").all() and (rows["model"] == "m").all()
    done, pending = plan_rows(iter_score_manifest(folder, STYLE, batch_rows=2), str(tmp_path / "out"))
    assert len(done) == 0 and sorted(pending.column("image_id").to_pylist()) == ids


def test_a_customize_output_over_several_shards_gives_a_pair_per_generated_image(tmp_path):
    folder = str(tmp_path / "cust")
    _run_output(folder, folder, job="customize")
    outputs = lambda i, n: json.dumps([f"{folder}/images/{i}-h-{k}.png" for k in range(n)])  # noqa: E731
    _ledger(
        folder, ["p1", "p2", "p3", "p4"], rows_per_shard=2,
        reference_uri=["/r/1.jpg", "/r/2.jpg", "/r/3.jpg", "/r/4.jpg"],
        output_uris=[outputs("p1", 2), None, outputs("p3", 3), outputs("p4", 1)],
        status=["ok", "no_face", "ok", "write_error"], error=[None, "no face in the reference", None, "disk full"],
        backend=["facesnap"] * 4, model=["tiny"] * 4,
    )  # fmt: skip
    reader = iter_score_manifest(folder, None, batch_rows=1)
    # a batch of one metrics row: its generated images (shards in name order, the rows in theirs)
    assert sorted(t.num_rows for t in reader) == [1, 1, 2, 3]
    rows = score_input(folder).set_index("image_id")
    assert sorted(rows.index) == ["p1-0", "p1-1", "p2", "p3-0", "p3-1", "p3-2", "p4"]
    assert [i for i in rows.index if i.startswith("p3")] == ["p3-0", "p3-1", "p3-2"]
    assert rows.at["p3-2", "output_uri"] == f"{folder}/images/p3-h-2.png"
    assert rows.at["p3-2", "image_uri"] == rows.at["p3-2", "reference_uri"] == "/r/3.jpg"
    assert rows.at["p2", "status"] == "no_face" and rows.at["p2", "error"] == "not scored: no face in the reference"
    assert rows.at["p4", "status"] == "write_error" and pd.isna(rows.at["p4", "output_uri"])
    assert (rows["engine"] == "facesnap").all()
    # a generated image's id taken by another row of the output: refused, named
    _ledger(folder, ["p1-1"], reference_uri=["/r/9.jpg"], output_uris=[None], status=["no_face"], error=[None])
    with pytest.raises(ValueError, match=r"1 duplicate image_id\(s\), e.g. \['p1-1'\]"):
        plan_pending(
            iter_score_manifest(folder, None, batch_rows=1), str(tmp_path / "out"), {}, block_rows=lambda n: 1
        )


def test_a_folder_with_no_shards_or_no_outputs_is_refused(tmp_path):
    empty = str(tmp_path / "empty")
    _run_output(empty, empty)
    with pytest.raises(ValueError, match="no metrics shards"):
        iter_score_manifest(empty, None)
    no_outputs = str(tmp_path / "no-outputs")
    _run_output(no_outputs, no_outputs)
    _ledger(no_outputs, ["a"], image_uri=["/in/a.png"], status=["ok"])
    with pytest.raises(ValueError, match="name no image_uri/output_uri"):
        iter_score_manifest(no_outputs, None)


def test_run_score_hands_its_dataset_the_pending_rows_to_read_as_it_runs(tmp_path, ray_session, monkeypatch):
    """The plan does not read the pending rows: ``build_chain`` gets ``PendingRows``, read by the dataset's own
    tasks in blocks of about ``input_block_rows``, not a table held by the driver; rows already scored are not
    in them."""
    import ray

    manifest = _pairs_prefix(tmp_path)
    output = str(tmp_path / "scores")
    _ledger(output, ["b"], status=["ok"])
    built = []

    def build(rows, specs, fusion):
        built.append((rows, specs))
        return rows.dataset().select_columns(["image_id", "status"])

    monkeypatch.setattr(pipelines.score, "build_chain", build)
    config = ScoreJobConfig()
    result = run_score(config, manifest, output)
    ((rows, specs),) = built
    assert isinstance(rows, PendingRows) and len(rows) == 5
    assert [s.name for s in specs] == ["load", "faces", "score", "write"] and specs[-1].kwargs["write_images"] is False
    per_block = input_block_rows(5, first_batch_rows(config), ray.cluster_resources()["CPU"])
    assert rows.block_rows == per_block
    tables = list(rows.dataset().iter_batches(batch_format="pyarrow", batch_size=None))
    assert all(t.num_rows <= per_block for t in tables) and sum(t.num_rows for t in tables) == 5
    expected = score_input(manifest)
    expected = expected[expected["image_id"] != "b"]
    assert pa.concat_tables(tables, promote_options="permissive").column("image_id").to_pylist() == list(
        expected["image_id"]
    )
    assert (result.total_rows, result.already_done, result.processed) == (6, 1, 5)
    assert result.status_counts == {"ok": 4, "missing": 1}

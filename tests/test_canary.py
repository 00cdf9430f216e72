"""``stylid canary``: the pure pick (``stylid_core.canary``) and the command on a stylid output built with the
ledger writer (faces and metrics shards, run.json, _SUCCESS: what ``stylid run`` and ``stylid score`` leave)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli
from stylid_core import ledger
from stylid_core.canary import BUCKETS, bucket_counts, format_pick, pick_canary


def _faces(spec: dict[str, dict[str, int]]) -> pd.DataFrame:
    """``{image_id: {bucket: n}}`` as face rows."""
    rows = []
    for image_id, buckets in spec.items():
        k = 0
        for bucket, n in buckets.items():
            for _ in range(n):
                rows.append({"image_id": image_id, "face_index": k, "size_bucket": bucket})
                k += 1
    return pd.DataFrame(rows)


# a dataset: many single-bucket images, and a few group photos that cover several buckets at once
SPEC = {
    **{f"solo{i:02d}": {"64-128": 1} for i in range(30)},
    **{f"far{i:02d}": {"<32": 2} for i in range(6)},
    "group1": {"<32": 4, "32-48": 5, "48-64": 3},
    "group2": {"32-48": 6, "48-64": 4, ">=128": 1},
    "crowd": {"<32": 10, "32-48": 2},
    "big": {">=128": 2, "64-128": 1},
    "none": {},
}


def test_the_pick_reaches_min_faces_in_every_bucket_with_few_images():
    faces = _faces(SPEC)
    pick = pick_canary(faces, [*SPEC], min_faces=5, seed=1)
    assert all(pick.faces[b] >= 5 for b in BUCKETS if b != ">=128"), pick.faces
    assert pick.short == [">=128"] and pick.faces[">=128"] == 3 == pick.available[">=128"]  # all the dataset has
    # the groups cover <32, 32-48 and 48-64 at once: far fewer images than one per face
    assert pick.image_ids[0] == "group1" and {"group2", "big"} <= set(pick.image_ids)
    assert len(pick.image_ids) <= 8 and "none" not in pick.image_ids
    picked = bucket_counts(faces[faces["image_id"].isin(pick.image_ids)]).sum()
    assert {b: int(picked[b]) for b in BUCKETS} == pick.faces


def test_the_pick_is_seeded_and_only_takes_allowed_images():
    faces = _faces(SPEC)
    a = pick_canary(faces, [*SPEC], min_faces=5, seed=7)
    assert a.image_ids == pick_canary(faces, [*SPEC], min_faces=5, seed=7).image_ids
    solos = {tuple(s for s in pick_canary(faces, [*SPEC], 5, seed=s).image_ids if s.startswith("solo"))
             for s in range(6)}  # fmt: skip
    assert len(solos) > 1  # the seed decides among equals
    without_crowd = pick_canary(faces, [i for i in SPEC if i != "crowd"], min_faces=5, seed=7)
    assert "crowd" not in without_crowd.image_ids and without_crowd.faces["<32"] >= 5  # the far images instead
    assert len(pick_canary(faces, [*SPEC], min_faces=5, max_images=2).image_ids) == 2


def test_repeated_face_rows_count_once():
    faces = _faces({"a": {"<32": 3}})
    twice = pd.concat([faces, faces])
    assert pick_canary(twice, ["a"], min_faces=5).faces["<32"] == 3
    with pytest.raises(ValueError):
        pick_canary(faces, ["a"], min_faces=0)


def _output(tmp_path, job: str, spec: dict) -> str:
    root = str(tmp_path / job)
    faces = _faces(spec)
    faces["x0"] = 0.0
    ids = list(spec)
    metrics = pd.DataFrame({"image_id": ids, "status": ["ok"] * (len(ids) - 1) + ["read_error"],
                            "image_uri": [f"s3://b/src/{i}.jpg" for i in ids],
                            "output_uri": [f"s3://b/out/{i}.png" for i in ids], "style_uri": None})  # fmt: skip
    ledger.write_shard_pair(root, pa.Table.from_pandas(faces), pa.Table.from_pandas(metrics), {})
    (tmp_path / job / "run.json").write_text(json.dumps({"job": job}))
    (tmp_path / job / "_SUCCESS").write_text("")
    return root


@pytest.mark.parametrize("job", ["run", "score"])
def test_stylid_canary_writes_the_manifest_its_job_reads(tmp_path, capsys, job):
    spec = {**SPEC, "broken": {"<32": 50}}  # the last row failed (read_error): never picked
    dataset = _output(tmp_path, job, spec)
    manifest = str(tmp_path / f"canary-{job}.parquet")
    rc = cli(["canary", "--dataset", dataset, "--output", manifest, "--min-faces", "5", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 3 and "could not reach min_faces: >=128 (3 faces)" in out  # only 3 faces of >=128 exist
    table = pq.read_table(manifest).to_pandas()
    if job == "run":  # what `stylid run --manifest` reads
        assert list(table.columns) == ["image_id", "image_uri"]
        assert set(table["image_uri"]) == {f"s3://b/src/{i}.jpg" for i in table["image_id"]}
    else:  # what `stylid score --manifest` reads
        assert list(table.columns) == ["image_id", "source_uri", "output_uri"]
        assert set(table["output_uri"]) == {f"s3://b/out/{i}.png" for i in table["image_id"]}
    assert "broken" not in set(table["image_id"]) and "group1" in set(table["image_id"])
    faces = _faces(spec)
    counts = bucket_counts(faces[faces["image_id"].isin(table["image_id"])]).sum()
    for b in BUCKETS:
        assert f"{b:>7} {int(counts[b]):>6}" in out  # the printed faces per bucket are the manifest's
    # with a bucket-filling threshold every bucket is reached: exit 0
    rc = cli(["canary", "--dataset", dataset, "--output", manifest, "--min-faces", "3"])
    assert rc == 0 and "could not reach" not in capsys.readouterr().out
    # bad input: exit 2 in one line
    assert cli(["canary", "--dataset", str(tmp_path / "nowhere"), "--output", manifest]) == 2
    (tmp_path / job / "_SUCCESS").unlink()
    assert cli(["canary", "--dataset", dataset, "--output", manifest]) == 2
    assert "did not finish" in capsys.readouterr().err


def test_only_the_buckets_asked_for_are_sought():
    faces = _faces(SPEC)
    pick = pick_canary(faces, [*SPEC], min_faces=5, seed=1, buckets=["<32", "32-48"])
    assert pick.short == [] and pick.buckets == ["<32", "32-48"]  # >=128 cannot be filled, but was not asked for
    assert pick.faces["<32"] >= 5 and pick.faces["32-48"] >= 5
    assert len(pick.image_ids) <= 2  # group1 (or crowd) fills both: no solo picked for 64-128
    assert not any(i.startswith("solo") for i in pick.image_ids)
    assert "(not sought)" in format_pick(pick)
    with pytest.raises(ValueError, match="choose among"):
        pick_canary(faces, [*SPEC], min_faces=5, buckets=["tiny"])


def test_stylid_canary_reaches_s3_through_the_configs_storage_options(tmp_path, s3_endpoint, monkeypatch, capsys):
    """The dataset and the manifest on S3 whose endpoint only ``io.storage_options`` names (no AWS_ENDPOINT_URL):
    the command reads and writes with them."""
    import boto3

    from stylid_core.storage import read_bytes

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="canary-opts")
    local = _output(tmp_path, "run", SPEC)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            s3.upload_file(path, "canary-opts", "runs/" + os.path.relpath(path, local))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = f"io.storage_options={{endpoint_url: '{s3_endpoint}'}}"
    manifest = "s3://canary-opts/canary.parquet"
    rc = cli(["canary", "--dataset", "s3://canary-opts/runs", "--output", manifest, "--min-faces", "3",
              "--buckets", "<32,32-48", "--set", options])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    table = pq.read_table(pa.BufferReader(read_bytes(manifest, {"endpoint_url": s3_endpoint})))
    assert table.num_rows >= 1 and set(table.column_names) == {"image_id", "image_uri"}

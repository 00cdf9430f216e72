"""The driver's plan without Ray: a manifest prefix read in bounded Arrow batches, validated, and the ledger's rows
subtracted (``ManifestReader`` + ``plan_pending``)."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.schema import derive_image_id
from pipelines.stylize import PLAN_DIR, ManifestReader, PendingFiles, plan_pending, plan_spill_dir, read_manifest
from stylid_core.ledger import ShardWriter


def _prefix(path, frames: list[pd.DataFrame]) -> str:
    os.makedirs(path, exist_ok=True)
    for k, df in enumerate(frames):
        df.to_parquet(os.path.join(path, f"part-{k}.parquet"), index=False)
    return str(path)


def _ledger(output: str, ids: list[str]) -> None:
    writer = ShardWriter(output, {}, rows_per_shard=4)
    writer.add(pa.table({"image_id": ids, "status": ["ok"] * len(ids)}))
    writer.flush()


def test_plan_keeps_exactly_the_pending_rows_of_a_manifest_prefix(tmp_path):
    frames = [
        pd.DataFrame({"image_id": [f"a{k}" for k in range(9)], "image_uri": [f"/in/a{k}.png" for k in range(9)]}),
        pd.DataFrame({"image_uri": [f"/in/b{k}.png" for k in range(5)] + [""]}),  # ids derived; an empty URI
        pd.DataFrame({"image_id": ["c0", "c1"], "image_uri": ["/in/c0.png", "/in/c1.png"],
                      "style_uri": ["/s/one.png", None]}),  # fmt: skip
    ]
    manifest = _prefix(tmp_path / "manifest", frames)
    derived = [derive_image_id(f"/in/b{k}.png") for k in range(5)]
    output = str(tmp_path / "out")
    done_ids = ["a1", "a2", "a8", derived[3], "c1", "not-in-the-manifest"]
    _ledger(output, done_ids)
    reader = ManifestReader(manifest, "/s/default.png", batch_rows=4)  # batches cut across files and the ledger
    done, pending = plan_pending(reader, output, {})
    all_ids = read_manifest(manifest, "/s/default.png").column("image_id").to_pylist()
    assert len(all_ids) == 17 and len(set(all_ids)) == 17
    assert sorted(done.to_pylist()) == sorted(set(done_ids) & set(all_ids))
    assert pending.column("image_id").to_pylist() == [i for i in all_ids if i not in set(done_ids)]
    rows = pending.to_pandas().set_index("image_id")
    assert rows.at["c0", "style_uri"] == "/s/one.png" and rows.at[derived[0], "style_uri"] == "/s/default.png"
    assert (rows["status"] == "missing").sum() == 1 and rows["error"].dropna().tolist() == ["empty image_uri"]
    # a plain table plans the same
    done2, pending2 = plan_pending(read_manifest(manifest, "/s/default.png"), output, {})
    assert sorted(done2.to_pylist()) == sorted(done.to_pylist())
    assert pending2.column("image_id").to_pylist() == pending.column("image_id").to_pylist()


def test_duplicates_across_files_are_found_before_the_plan(tmp_path):
    frames = [pd.DataFrame({"image_id": ["x", "y"], "image_uri": ["/a", "/b"]}),
              pd.DataFrame({"image_id": ["z", "x"], "image_uri": ["/c", "/d"]})]  # fmt: skip
    reader = ManifestReader(_prefix(tmp_path / "m", frames), None, batch_rows=1)
    with pytest.raises(ValueError, match=r"1 duplicate image_id\(s\), e.g. \['x'\]"):
        plan_pending(reader, str(tmp_path / "out"), {})
    with pytest.raises(ValueError, match="no 'image_uri' column"):
        ManifestReader(_prefix(tmp_path / "bad", [pd.DataFrame({"path": ["/a"]})]), None)


def test_a_spilled_plan_writes_the_same_pending_rows_to_a_few_parquet_files(tmp_path):
    """``plan_pending`` with a ``spill_dir``: the pending rows go to Parquet files batch by batch (none held on the
    driver), at least ``batch_rows`` a file; the same rows as in memory, each once; ``remove`` leaves nothing."""
    ks = [range(j, j + 40) for j in (0, 40, 80)]
    frames = [pd.DataFrame({"image_id": [f"r{k:03d}" for k in r], "image_uri": [f"/in/{k}" for k in r]}) for r in ks]
    manifest = _prefix(tmp_path / "manifest", frames)
    output = str(tmp_path / "out")
    _ledger(output, [f"r{k:03d}" for k in range(0, 120, 3)])
    reader = ManifestReader(manifest, "/s/default.png", batch_rows=16)
    done_mem, in_memory = plan_pending(reader, output, {})
    spill_dir = plan_spill_dir(output)
    assert spill_dir.startswith(os.path.join(os.path.abspath(output), PLAN_DIR) + os.sep)
    done, files = plan_pending(reader, output, {}, spill_dir)
    assert isinstance(files, PendingFiles) and len(files) == 80 == in_memory.num_rows
    assert sorted(done.to_pylist()) == sorted(done_mem.to_pylist())
    assert len(files.paths) == 5  # 80 rows in files of batch_rows (16) rows, cut across the manifest's batches
    assert [pq.ParquetFile(p).metadata.num_rows for p in files.paths] == [16] * 5
    spilled = files.to_table()
    assert spilled.column("image_id").to_pylist() == in_memory.column("image_id").to_pylist()
    assert spilled.select(in_memory.column_names).cast(in_memory.schema).equals(in_memory)
    files.remove()
    assert not os.path.exists(os.path.join(output, PLAN_DIR))
    # nothing pending: no file at all
    _ledger(output, [f"r{k:03d}" for k in range(120)])
    done, files = plan_pending(reader, output, {}, plan_spill_dir(output))
    assert len(done) == 120 and len(files) == 0 and files.paths == []


def test_a_plan_that_fails_while_spilling_leaves_no_files(tmp_path):
    frames = [pd.DataFrame({"image_id": [f"r{k}" for k in range(30)], "image_uri": [f"/in/{k}" for k in range(30)]})]
    reader = ManifestReader(_prefix(tmp_path / "m", frames), None, batch_rows=8)
    spill_dir = str(tmp_path / "out" / PLAN_DIR / "run")
    batches = iter(reader)

    class Shrinking(ManifestReader):  # the manifest loses rows between its two passes
        def __iter__(self):
            yield next(batches)

    shrinking = Shrinking(reader.manifest_uri, None, batch_rows=8)
    with pytest.raises(RuntimeError, match="changed while it was read"):
        plan_pending(shrinking, str(tmp_path / "out"), {}, spill_dir)
    assert not os.path.exists(tmp_path / "out" / PLAN_DIR)

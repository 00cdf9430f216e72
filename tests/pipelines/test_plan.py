"""The driver's plan without Ray: a manifest prefix read in bounded Arrow batches, validated, and the ledger's rows
subtracted (``ManifestReader`` + ``plan_pending``)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.manifest import ManifestReader
from pipelines.plan import plan_pending
from pipelines.schema import derive_image_id
from stylid_core.ledger import ShardWriter
from tests.pending import plan_rows


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
        pd.DataFrame(
            {"image_id": ["c0", "c1"], "image_uri": ["/in/c0.png", "/in/c1.png"], "style_uri": ["/s/one.png", None]}
        ),  # fmt: skip
    ]
    manifest = _prefix(tmp_path / "manifest", frames)
    derived = [derive_image_id(f"/in/b{k}.png") for k in range(5)]
    output = str(tmp_path / "out")
    done_ids = ["a1", "a2", "a8", derived[3], "c1", "not-in-the-manifest"]
    _ledger(output, done_ids)
    reader = ManifestReader(manifest, "/s/default.png", batch_rows=4)  # batches cut across files and the ledger
    done, pending = plan_rows(reader, output)
    all_ids = [i for t in ManifestReader(manifest, "/s/default.png") for i in t.column("image_id").to_pylist()]
    assert len(all_ids) == 17 and len(set(all_ids)) == 17
    assert sorted(done.to_pylist()) == sorted(set(done_ids) & set(all_ids))
    assert pending.column("image_id").to_pylist() == [i for i in all_ids if i not in set(done_ids)]
    rows = pending.to_pandas().set_index("image_id")
    assert rows.at["c0", "style_uri"] == "/s/one.png" and rows.at[derived[0], "style_uri"] == "/s/default.png"
    assert (rows["status"] == "missing").sum() == 1 and rows["error"].dropna().tolist() == ["empty image_uri"]


def test_duplicates_across_files_are_found_before_the_plan(tmp_path):
    frames = [pd.DataFrame({"image_id": ["x", "y"], "image_uri": ["/a", "/b"]}),
              pd.DataFrame({"image_id": ["z", "x"], "image_uri": ["/c", "/d"]})]  # fmt: skip
    reader = ManifestReader(_prefix(tmp_path / "m", frames), None, batch_rows=1)
    with pytest.raises(ValueError, match=r"1 duplicate image_id\(s\), e.g. \['x'\]"):
        plan_pending(reader, str(tmp_path / "out"), {}, block_rows=lambda n: 10)
    with pytest.raises(ValueError, match="no 'image_uri' column"):
        ManifestReader(_prefix(tmp_path / "bad", [pd.DataFrame({"path": ["/a"]})]), None)


def _read_blocks(rows) -> list[pa.Table]:
    """Every block of ``PendingRows``' dataset, as its read tasks yield them (tasks in any order)."""
    return [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
            for b in rows.dataset().iter_batches(batch_format="pyarrow", batch_size=None)]  # fmt: skip


def test_a_plan_with_block_rows_is_read_by_ray_as_the_dataset_runs(tmp_path, ray_session):
    """``plan_pending`` with ``block_rows``: the pending rows are not read by the plan (``PendingRows``: read
    tasks of a manifest batch each, with their done flags); the dataset's read tasks yield them in blocks of
    about the asked size; the same rows as the plan in memory, each once."""
    from pipelines.plan import PendingRows

    frames = [pd.DataFrame({"image_id": [f"r{k:03d}" for k in r], "image_uri": [f"/in/{k}" for k in r]})
              for r in (range(0, 40), range(40, 100))]  # fmt: skip
    manifest = _prefix(tmp_path / "manifest", frames)
    output = str(tmp_path / "out")
    _ledger(output, [f"r{k:03d}" for k in range(0, 100, 4)])
    reader = ManifestReader(manifest, "/s/default.png", batch_rows=32)
    _, in_memory = plan_rows(reader, output)
    asked = []
    done, rows = plan_pending(reader, output, {}, block_rows=lambda n: asked.append(n) or 10)
    assert isinstance(rows, PendingRows) and asked == [75] and len(rows) == 75 and len(done) == 25
    # one row group a file (40, 60 rows), cut at 32 rows: tasks of 32, 8 | 32, 28 rows keep 24, 6 | 24, 21
    assert [(os.path.basename(s.path), s.start, s.pending) for s in rows.slices] == [
        ("part-0.parquet", 0, 24),
        ("part-0.parquet", 32, 6),
        ("part-1.parquet", 0, 24),
        ("part-1.parquet", 32, 21),
    ]
    tables = _read_blocks(rows)
    # 8 blocks asked of 4 tasks: each task's rows in 2 blocks
    assert sorted(t.num_rows for t in tables) == [3, 3, 10, 11, 12, 12, 12, 12]
    got = pa.concat_tables([t.cast(in_memory.schema) for t in tables]).sort_by("image_id")
    assert got.equals(in_memory.sort_by("image_id"))


def test_pending_rows_skip_rows_already_done_and_join_small_row_groups(tmp_path, ray_session):
    """A read task's rows all in the ledger make no task; small row groups of a file share one task, up to a
    manifest batch, never splitting a group."""
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "m")
    ids = [f"r{k:03d}" for k in range(50)]
    pq.write_table(pa.table({"image_id": ids, "image_uri": [f"/in/{i}" for i in ids]}),
                   tmp_path / "m" / "part-0.parquet", row_group_size=10)  # fmt: skip
    output = str(tmp_path / "out")
    done = ids[20:40] + ids[45:46]  # the second task's rows all done, one row of the third
    _ledger(output, done)
    reader = ManifestReader(str(tmp_path / "m"), None, batch_rows=20)
    _, rows = plan_pending(reader, output, {}, block_rows=lambda n: 100)
    # groups 0, 1 | 2, 3 (all done: no task) | 4
    assert [(s.row_groups, s.start, s.pending) for s in rows.slices] == [([0, 1], 0, 20), ([4], 0, 9)]
    got = sorted(i for t in _read_blocks(rows) for i in t.column("image_id").to_pylist())
    assert got == sorted(set(ids) - set(done))


def test_pending_rows_fail_when_the_manifest_changed_after_the_plan(tmp_path, ray_session):
    """A manifest rewritten between the plan and its read (rows removed) fails the read, naming the file,
    rather than marking the wrong rows done."""
    import ray

    frames = [pd.DataFrame({"image_id": [f"r{k}" for k in range(8)], "image_uri": [f"/in/{k}" for k in range(8)]})]
    manifest = _prefix(tmp_path / "m", frames)
    _, rows = plan_pending(ManifestReader(manifest, None), str(tmp_path / "out"), {}, block_rows=lambda n: 4)
    _prefix(tmp_path / "m", [frames[0].iloc[:5]])
    with pytest.raises((RuntimeError, ray.exceptions.RayError), match="changed while it was read"):
        _read_blocks(rows)


def _one_group_manifest(tmp_path, n: int) -> str:
    """``n`` rows ``r000``.. in one file of one row group."""
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "m")
    ids = [f"r{k:03d}" for k in range(n)]
    pq.write_table(pa.table({"image_id": ids, "image_uri": [f"/in/{i}" for i in ids]}), tmp_path / "m" / "p.parquet")
    return str(tmp_path / "m")


def test_pending_rows_are_cut_into_pieces_of_block_rows_pending_rows(tmp_path):
    """A slice's pieces: consecutive row ranges covering the slice, each with ``block_rows`` pending rows (the last
    fewer), their done flags a bit a row; read back (``read_piece``), they are exactly the plan's pending rows."""
    from pipelines.plan import PIECE_SCHEMA

    manifest = _one_group_manifest(tmp_path, 100)
    output = str(tmp_path / "out")
    done_ids = [f"r{k:03d}" for k in range(0, 100, 3)] + [f"r{k:03d}" for k in range(60, 75)]
    _ledger(output, done_ids)
    reader = ManifestReader(manifest, "/s/default.png", batch_rows=64)
    _, in_memory = plan_rows(reader, output)
    _, rows = plan_pending(reader, output, {}, block_rows=lambda n: 10)
    pieces = [p for part in rows.slices for p in part.pieces(rows.block_rows)]
    assert all(p.schema.equals(PIECE_SCHEMA) and p.num_rows == 1 for p in pieces)
    ranges = [(p["start"][0].as_py(), p["stop"][0].as_py()) for p in pieces]
    # slices of 64 and 36 rows; each piece's range starts where the last ended, within its slice
    assert ranges[0][0] == 0 and ranges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert 64 in [stop for _, stop in ranges]
    got = [rows.reader.read_piece(p.to_pylist()[0]) for p in pieces]
    per_slice_last = {i for i, (_, stop) in enumerate(ranges) if stop in (64, 100)}
    assert all(t.num_rows == 10 for i, t in enumerate(got) if i not in per_slice_last)
    assert pa.concat_tables([t.cast(in_memory.schema) for t in got]).equals(in_memory)


def test_a_reader_given_pieces_in_order_decodes_a_row_group_once(tmp_path, monkeypatch):
    """An actor's reader keeps its read of a row group open between pieces and goes on from there (Parquet has
    no row-level seek): every other piece (two actors sharing a slice) opens the file once; a piece behind its
    read opens it again and still reads the right rows; a pickled reader carries no open read."""
    from ray import cloudpickle as pickle  # what Ray ships a stage's arguments with

    import pipelines.plan as plan

    manifest = _one_group_manifest(tmp_path, 60)
    _, rows = plan_pending(ManifestReader(manifest, None, batch_rows=64), str(tmp_path / "out"), {},
                           block_rows=lambda n: 6)  # fmt: skip
    pieces = [p.to_pylist()[0] for part in rows.slices for p in part.pieces(rows.block_rows)]
    assert len(pieces) == 10
    opened = []
    real = plan.read_manifest_file
    monkeypatch.setattr(plan, "read_manifest_file", lambda *a, **k: opened.append(k["start"]) or real(*a, **k))
    ids = lambda t: t.column("image_id").to_pylist()  # noqa: E731
    first, second = pickle.loads(pickle.dumps(rows.reader)), pickle.loads(pickle.dumps(rows.reader))
    assert ids(first.read_piece(pieces[0])) == [f"r{k:03d}" for k in range(6)]
    assert ids(second.read_piece(pieces[1])) == [f"r{k:03d}" for k in range(6, 12)]
    for k in range(2, 10):
        got = (first if k % 2 == 0 else second).read_piece(pieces[k])
        assert ids(got) == [f"r{j:03d}" for j in range(6 * k, 6 * k + 6)]
    assert opened == [0, 6]  # each reader opened the file once, where its first piece starts
    assert ids(first.read_piece(pieces[3])) == [f"r{k:03d}" for k in range(18, 24)]  # behind: read again
    assert opened == [0, 6, 18]
    assert pickle.loads(pickle.dumps(first))._open == {}


def test_a_piece_of_a_manifest_changed_after_the_plan_fails_its_read(tmp_path):
    """Rows removed from the manifest between the plan and an actor's read of its piece fail the read, naming
    the file, rather than marking the wrong rows done: every piece, since the file is another version (a rewrite
    that keeps the row count, the rows reordered, is caught the same way: tests/test_hostile_input.py)."""
    manifest = _one_group_manifest(tmp_path, 30)
    _, rows = plan_pending(ManifestReader(manifest, None), str(tmp_path / "out"), {}, block_rows=lambda n: 10)
    pieces = [p.to_pylist()[0] for part in rows.slices for p in part.pieces(rows.block_rows)]
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(manifest, "p.parquet")).slice(0, 25)
    pq.write_table(table, os.path.join(manifest, "p.parquet"))
    for piece in (pieces[0], pieces[2]):
        with pytest.raises(RuntimeError, match=r"p.parquet changed while it was read: rewritten after the plan"):
            rows.reader.read_piece(piece)


def test_ids_that_share_a_hash_are_still_told_apart(tmp_path, monkeypatch):
    """The plan keeps 64-bit hashes of the ids, not the ids: with every id given the same hash (as if they all
    collided), duplicates are still exactly the duplicated ids, and the ledger still subtracts exactly its own."""
    from stylid_core import ledger

    monkeypatch.setattr(ledger, "id_hashes", lambda ids: np.full(len(ids), 7, np.uint64))
    frames = [pd.DataFrame({"image_id": ["a", "b", "c"], "image_uri": ["/a", "/b", "/c"]}),
              pd.DataFrame({"image_id": ["d", "e"], "image_uri": ["/d", "/e"]})]  # fmt: skip
    output = str(tmp_path / "out")
    _ledger(output, ["b", "e", "zz"])
    done, pending = plan_rows(ManifestReader(_prefix(tmp_path / "m", frames), None, batch_rows=2), output)
    assert sorted(done.to_pylist()) == ["b", "e"] and pending.column("image_id").to_pylist() == ["a", "c", "d"]
    frames.append(pd.DataFrame({"image_id": ["c", "f", "a"], "image_uri": ["/c2", "/f", "/a2"]}))
    with pytest.raises(ValueError, match=r"2 duplicate image_id\(s\)"):
        ManifestReader(_prefix(tmp_path / "m2", frames), None, batch_rows=2).scan_ids()

"""The shards and the resume ledger (``stylid_core.ledger``) without Ray: row-sized shards, crash safety,
compaction (idempotent, interrupted at every step), projected ledger reads and the scan-based summary."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stylid_core.ledger as ledger
from stylid_core.faces.base import size_bucket
from stylid_core.ledger import FACE_ROWS, ShardWriter, compact, done_ids, drop_orphan_face_shards, iter_shards
from stylid_core.report import summarize_output

FACE = pa.struct([("image_id", pa.string()), ("face_index", pa.int32()), ("size_px", pa.float64()),
                  ("size_bucket", pa.string()), ("in_mosaic", pa.bool_()), ("id_sim", pa.float64()),
                  ("id_sim_no_mosaic", pa.float64()), ("id_match", pa.bool_()), ("id_match_no_mosaic", pa.bool_()),
                  ("redetected", pa.bool_()), ("photo_detail_fine", pa.float64()),
                  ("photo_detail_mid", pa.float64())])  # fmt: skip


def n_faces(image_id: str) -> int:
    """Faces of a synthetic row: 0-3, by id (0 makes it a ``no_face`` row)."""
    return int(image_id.split("-")[1]) % 4


def rows(ids: list[str], seed: int = 0, big_error: int = 0) -> pa.Table:
    """A write stage's output for ``ids``: metrics columns plus ``FACE_ROWS`` (0-3 faces a row, by id)."""
    rng = np.random.default_rng(seed)
    status, faces = [], []
    for k, i in enumerate(ids):
        n = n_faces(i)
        status.append("ok" if n else "no_face")
        faces.append([{"image_id": i, "face_index": f, "size_px": float(s), "size_bucket": size_bucket(float(s)),
                       "in_mosaic": bool(s < 64), "id_sim": float(rng.uniform(0.2, 1)),
                       "id_sim_no_mosaic": float(rng.uniform(0, 1)), "id_match": bool(rng.random() < 0.7),
                       "id_match_no_mosaic": bool(rng.random() < 0.5),
                       "redetected": None if (k + f) % 5 == 0 else bool(rng.random() < 0.6),
                       "photo_detail_fine": None if (k + f) % 7 == 0 else float(rng.uniform(0.2, 1)),
                       "photo_detail_mid": float(rng.uniform(0.5, 1))}
                      for f, s in enumerate(rng.uniform(20, 200, n))])  # fmt: skip
    ok = [s == "ok" for s in status]
    return pa.table({
        "image_id": pa.array(ids, pa.string()),
        "status": pa.array(status, pa.string()),
        "error": pa.array([rng.bytes(big_error // 2).hex() if big_error else None for _ in ids], pa.string()),
        "engine": pa.array(["classical" if o else None for o in ok], pa.string()),
        "model": pa.array(["opencv" if o else None for o in ok], pa.string()),
        "colour_distance": pa.array([float(rng.uniform(5, 30)) if o else None for o in ok], pa.float64()),
        "style_distance": pa.array([float(rng.uniform(1, 5)) if o else None for o in ok], pa.float64()),
        "content_ssim": pa.array([float(rng.uniform(0, 1)) if o else None for o in ok], pa.float64()),
        FACE_ROWS: pa.array(faces, pa.list_(FACE)),
    })  # fmt: skip


def ids(n: int, start: int = 0) -> list[str]:
    return [f"img-{k:05d}" for k in range(start, start + n)]


def write(output: str, batches: list[list[str]], rows_per_shard: int, **kw) -> ShardWriter:
    writer = ShardWriter(output, {}, rows_per_shard)
    for b in batches:
        writer.add(rows(b, **kw))
    writer.flush()
    return writer


def ledger_ids(output: str) -> list[str]:
    return sorted(done_ids(output, {}).to_pylist())


def live_faces(output: str) -> pd.DataFrame:
    return pd.concat([t.to_pandas() for t in iter_shards(output, "faces", {})] or [pd.DataFrame()])


def files(output: str, sub: str) -> list[str]:
    d = os.path.join(output, sub)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_shards_are_written_every_n_rows_and_at_the_end(tmp_path):
    out = str(tmp_path)
    writer = ShardWriter(out, {}, rows_per_shard=5)
    for k in range(4):  # batches of 3 rows: 12 rows in all
        writer.add(rows(ids(3, 3 * k)))
        assert len(files(out, "metrics")) == (3 * (k + 1)) // 5  # a shard as soon as 5 rows are in
    assert writer.rows_written == 10
    writer.flush()
    shards = [pq.read_table(tmp_path / "metrics" / n) for n in files(out, "metrics")]
    assert sorted(s.num_rows for s in shards) == [2, 5, 5]
    assert files(out, "faces") == files(out, "metrics")  # one faces shard per metrics shard, same name
    for name in files(out, "metrics"):
        m = pq.read_table(tmp_path / "metrics" / name)
        f = pq.read_table(tmp_path / "faces" / name)
        assert FACE_ROWS not in m.column_names
        assert name == ledger.shard_name(m["image_id"].to_pylist())
        assert set(f["image_id"].to_pylist()) <= set(m["image_id"].to_pylist())
        expected = sum(n_faces(i) for i in m["image_id"].to_pylist())
        assert f.num_rows == expected
    assert ledger_ids(out) == ids(12)
    writer.flush()  # nothing buffered: nothing written
    assert len(files(out, "metrics")) == 3


def test_a_crash_loses_only_unflushed_rows_and_an_orphan_faces_shard_is_never_counted(tmp_path, monkeypatch):
    out = str(tmp_path)
    writer = ShardWriter(out, {}, rows_per_shard=4)
    writer.add(rows(ids(10)))  # two shards written, 2 rows buffered
    del writer  # the driver dies: its buffer is lost, nothing else
    assert ledger_ids(out) == ids(8)
    # a crash between a shard's two puts: the faces shard is on storage, its metrics shard is not
    real = ledger.write_bytes

    def die_on_metrics(uri, data, opts=None):
        if "/metrics/" in uri:
            raise KeyboardInterrupt("killed")
        real(uri, data, opts)

    monkeypatch.setattr(ledger, "write_bytes", die_on_metrics)
    with pytest.raises(KeyboardInterrupt):
        write(out, [ids(2, 8)], 4)
    monkeypatch.setattr(ledger, "write_bytes", real)
    assert len(files(out, "faces")) == 3 and len(files(out, "metrics")) == 2
    assert ledger_ids(out) == ids(8)
    assert sorted(set(live_faces(out)["image_id"])) == sorted({i for i in ids(8) if n_faces(i)})
    # the rerun redoes exactly the rows not in the ledger, drawing other shard boundaries
    dropped = drop_orphan_face_shards(out, {})
    assert len(dropped) == 1 and len(files(out, "faces")) == 2
    done = set(ledger_ids(out))
    todo = [i for i in ids(12) if i not in done]
    assert todo == ids(4, 8)
    write(out, [todo[:1], todo[1:]], 3)
    assert ledger_ids(out) == ids(12)
    faces = live_faces(out)
    assert not faces.duplicated(["image_id", "face_index"]).any()
    assert len(faces) == sum(n_faces(i) for i in ids(12))
    assert files(out, "faces") == files(out, "metrics")


def small_shard_output(path: str) -> str:
    """An output as an earlier version wrote it: one shard per batch of 1-4 rows (23 shards, 60 rows)."""
    sizes = [4, 1, 3, 2, 4, 4, 1, 2, 3, 3, 2, 4, 1, 1, 4, 3, 2, 4, 2, 3, 1, 2, 4]
    start = 0
    for n in sizes:
        ledger.write_shard_pair(path, *reversed(ledger.split_face_rows(rows(ids(n, start)))), {})
        start += n
    return path


def assert_same_summary(got: dict, want: dict) -> None:
    """Equal summaries, floats up to summation order."""
    assert got.keys() == want.keys()
    for key in ("rows", "status_counts", "faces", "engines"):
        assert got[key] == want[key], key
    for key in ("id_sim_mean", "id_sim_mean_no_mosaic", "style_distance_mean", "colour_distance_mean",
                "content_ssim_mean"):  # fmt: skip
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert [b["size_bucket"] for b in got["buckets"]] == [b["size_bucket"] for b in want["buckets"]]
    for g, w in zip(got["buckets"], want["buckets"]):
        assert g.keys() == w.keys()
        for key in g:
            assert g[key] == (
                w[key] if w[key] is None or isinstance(w[key], str) else pytest.approx(w[key], rel=1e-12)
            ), key


def check_ledger(out: str, n: int) -> None:
    """Every id exactly once in the ledger, its faces exactly once, and the scan summary of all n rows."""
    got = done_ids(out, {}).to_pylist()
    assert sorted(got) == ids(n) and len(got) == n
    faces = live_faces(out)
    assert not faces.duplicated(["image_id", "face_index"]).any()
    assert len(faces) == sum(n_faces(i) for i in ids(n))
    summary = summarize_output(out, {})
    assert summary["rows"] == n and summary["faces"] == len(faces)


def test_compaction_merges_small_shards_and_is_idempotent(tmp_path):
    out = small_shard_output(str(tmp_path / "out"))
    assert len(files(out, "metrics")) == 23
    before = summarize_output(out, {})
    result = compact(out, {}, rows_per_shard=10)
    assert result.shards_before == 23 and result.rows == 60
    assert files(out, "faces") == files(out, "metrics")
    sizes = sorted(pq.read_metadata(os.path.join(out, "metrics", n)).num_rows for n in files(out, "metrics"))
    assert result.shards_after == len(sizes) and sum(sizes) == 60 and max(sizes) <= 10
    assert len(sizes) <= 60 // 5 + 1  # every shard but one is more than half full
    assert sum(s < 5 for s in sizes) <= 1
    assert not [n for n in os.listdir(os.path.join(out, "metrics")) if n.endswith(".json")]
    check_ledger(out, 60)
    assert_same_summary(summarize_output(out, {}), before)
    snapshot = {sub: {n: os.path.getmtime(os.path.join(out, sub, n)) for n in files(out, sub)} for sub in
                ("metrics", "faces")}  # fmt: skip
    again = compact(out, {}, rows_per_shard=10)
    assert again.groups == 0 and again.shards_after == again.shards_before == len(sizes)
    assert {sub: {n: os.path.getmtime(os.path.join(out, sub, n)) for n in files(out, sub)} for sub in
            ("metrics", "faces")} == snapshot  # nothing rewritten  # fmt: skip


class Interrupted(BaseException):
    pass


def dies_at(real, count: list[int], k: int):
    """``real``, raising ``Interrupted`` instead at the ``k``-th call (0-based) counted in ``count``."""

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == k + 1:
            raise Interrupted(f"step {k}")
        return real(*args, **kwargs)

    return wrapped


def test_compaction_interrupted_at_every_step_never_loses_or_doubles_a_row(tmp_path, monkeypatch):
    """Every put and delete of a compaction in turn raises (the process dies there): the ledger still shows each
    row exactly once, a plain rerun redoes exactly nothing twice, and the next compaction finishes the job."""
    base = small_shard_output(str(tmp_path / "base"))
    reference = str(tmp_path / "reference")
    shutil.copytree(base, reference)
    steps = []
    real_write, real_delete = ledger.write_bytes, ledger.delete
    monkeypatch.setattr(ledger, "write_bytes", lambda *a, **k: (steps.append("put"), real_write(*a, **k)))
    monkeypatch.setattr(ledger, "delete", lambda *a, **k: (steps.append("delete"), real_delete(*a, **k)))
    compact(reference, {}, rows_per_shard=10)
    final = (files(reference, "metrics"), files(reference, "faces"))
    assert steps.count("put") >= 6 and steps.count("delete") >= 10
    for k in range(len(steps)):
        out = str(tmp_path / f"cut{k}")
        shutil.copytree(base, out)
        count = [0]
        monkeypatch.setattr(ledger, "write_bytes", dies_at(real_write, count, k))
        monkeypatch.setattr(ledger, "delete", dies_at(real_delete, count, k))
        with pytest.raises(Interrupted):
            compact(out, {}, rows_per_shard=10)
        monkeypatch.setattr(ledger, "write_bytes", real_write)
        monkeypatch.setattr(ledger, "delete", real_delete)
        check_ledger(out, 60)
        # a run started now (before any compaction recovers) drops only faces that no reader counts
        drop_orphan_face_shards(out, {})
        check_ledger(out, 60)
        compact(out, {}, rows_per_shard=10)
        check_ledger(out, 60)
        assert (files(out, "metrics"), files(out, "faces")) == final, f"interrupted at step {k}"
        assert not [n for n in os.listdir(os.path.join(out, "metrics")) if n.endswith(".json")]


class CountingFile:
    def __init__(self, f, counter):
        self.f, self.counter = f, counter

    def read(self, *args):
        data = self.f.read(*args)
        self.counter[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_the_ledger_read_is_projected_to_the_ids(tmp_path, monkeypatch):
    out = str(tmp_path)
    write(out, [ids(400)], 100, big_error=8000)  # 4 shards whose rows carry 8 kB of error text each
    stored = sum(os.path.getsize(os.path.join(out, "metrics", n)) for n in files(out, "metrics"))
    read = [0]
    real = ledger.filesystem

    class CountingFS:
        def __init__(self, fs):
            self.fs = fs

        def open(self, path, mode="rb", **kw):
            return CountingFile(self.fs.open(path, mode, **kw), read)

    monkeypatch.setattr(ledger, "filesystem", lambda uri, opts=None: (CountingFS(real(uri, opts)[0]),
                                                                       real(uri, opts)[1]))  # fmt: skip
    assert ledger_ids(out) == ids(400)
    assert 0 < read[0] < stored / 5, (read[0], stored)


def pandas_summary(metrics: pd.DataFrame, faces: pd.DataFrame) -> dict:
    """The summary as the earlier whole-output pandas code computed it (reference for the scan)."""
    ok = metrics[metrics["status"] == "ok"]
    buckets = []
    for b, g in faces.groupby("size_bucket"):
        red = g["redetected"].dropna().astype(float)
        buckets.append({"size_bucket": b, "faces": len(g), "in_mosaic": int(g["in_mosaic"].sum()),
                        "id_sim": g["id_sim"].mean(), "id_sim_no_mosaic": g["id_sim_no_mosaic"].mean(),
                        "id_match": g["id_match"].astype(float).mean(),
                        "id_match_no_mosaic": g["id_match_no_mosaic"].astype(float).mean(),
                        "redetected": red.mean() if len(red) else None,
                        "photo_detail_fine": g["photo_detail_fine"].mean(),
                        "photo_detail_mid": g["photo_detail_mid"].mean(),
                        "photo_detail_fine_no_mosaic": None, "photo_detail_mid_no_mosaic": None,
                        "id_recovered": (g["id_sim"].mean() - g["id_sim_no_mosaic"].mean())
                        / (1 - g["id_sim_no_mosaic"].mean())})  # fmt: skip
    order = ["<32", "32-48", "48-64", "64-128", ">=128"]
    return {
        "rows": len(metrics),
        "status_counts": metrics["status"].value_counts().to_dict(),
        "faces": len(faces),
        "engines": sorted({f"{e} ({m})" for e, m in zip(ok["engine"], ok["model"])}),
        "id_sim_mean": faces["id_sim"].mean(),
        "id_sim_mean_no_mosaic": faces["id_sim_no_mosaic"].mean(),
        "style_distance_mean": ok["style_distance"].mean(),
        "colour_distance_mean": ok["colour_distance"].mean(),
        "content_ssim_mean": ok["content_ssim"].mean(),
        "buckets": sorted(buckets, key=lambda r: order.index(r["size_bucket"])),
    }


def test_the_summary_from_the_scan_equals_the_pandas_summary(tmp_path):
    out = str(tmp_path)
    write(out, [ids(37, 50 * k) for k in range(9)], 60, seed=3)  # 333 rows in 6 shards
    metrics = pd.concat([pq.read_table(tmp_path / "metrics" / n).to_pandas() for n in files(out, "metrics")])
    faces = pd.concat([pq.read_table(tmp_path / "faces" / n).to_pandas() for n in files(out, "faces")])
    assert len(files(out, "metrics")) == 6 and len(faces) > 300 and faces["redetected"].isna().any()
    got = summarize_output(out, {})
    assert_same_summary(got, pandas_summary(metrics, faces))
    json.dumps(got)  # run.json holds it


def test_rows_per_shard_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="rows_per_shard"):
        ShardWriter(str(tmp_path), {}, 0)
    from stylid_core.config import ConfigError, JobConfig

    with pytest.raises(ConfigError, match="rows_per_shard"):
        JobConfig.from_dict({"io": {"rows_per_shard": 0}})
    assert JobConfig.from_dict({"io": {"rows_per_shard": 7}}).config_hash() == JobConfig().config_hash()


def test_stylid_compact_command(tmp_path, capsys):
    from jobs.cli import main

    out = small_shard_output(str(tmp_path / "out"))
    assert main(["compact", out, "--rows-per-shard", "10"]) == 0
    assert "60 rows, 23 metrics shards ->" in capsys.readouterr().out
    check_ledger(out, 60)
    assert main(["compact", out, "--rows-per-shard", "10"]) == 0
    assert "(0 merged groups)" in capsys.readouterr().out


def test_ledger_and_compaction_on_s3(s3_endpoint):
    """The same ledger through fsspec on a real S3 endpoint (moto on 127.0.0.1): concurrent projected reads,
    compaction's puts and deletes, the journal listing."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint, skip_instance_cache=True)
    if not fs.exists("ledger-test"):
        fs.mkdir("ledger-test")
    out = "s3://ledger-test/out"
    start = 0
    for n in [3, 1, 4, 2, 2, 4, 1, 3]:  # 20 rows in 8 shards
        ledger.write_shard_pair(out, *reversed(ledger.split_face_rows(rows(ids(n, start)))), {})
        start += n
    assert sorted(done_ids(out, {}).to_pylist()) == ids(20)
    result = compact(out, {}, rows_per_shard=10)
    assert result.shards_before == 8 and result.shards_after < 8
    assert sorted(done_ids(out, {}).to_pylist()) == ids(20)
    faces = live_faces(out)
    assert len(faces) == sum(n_faces(i) for i in ids(20)) and not faces.duplicated(["image_id", "face_index"]).any()
    names = lambda sub: sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"ledger-test/out/{sub}", refresh=True))  # noqa: E731
    assert names("metrics") == names("faces") and len(names("metrics")) == result.shards_after
    assert summarize_output(out, {})["rows"] == 20


def test_an_id_set_is_exact_even_where_hashes_collide():
    """``IdSet`` finds ids by their sorted 64-bit hashes, then compares the strings: an id sharing another's hash
    is not taken for it, and an id whose hash two set members share is still found."""
    import numpy as np

    from stylid_core.ledger import IdSet

    members = IdSet(pa.chunked_array([["a", "b"], ["c"]]))
    assert members.contains(pa.array(["c", "x", "a", "", "b"])).tolist() == [True, False, True, False, True]
    members.hashes, members.order = np.array([1, 2, 2], np.uint64), np.array([0, 1, 2])  # b and c share hash 2
    probe = members.contains(pa.array(["a", "zz", "c", "b", "q"]), np.array([1, 1, 2, 2, 2], np.uint64))
    assert probe.tolist() == [True, False, True, True, False]
    assert IdSet(pa.array([], pa.string())).contains(pa.array(["a"])).tolist() == [False]

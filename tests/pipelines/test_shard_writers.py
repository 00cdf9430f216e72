"""The job's shard-writing actors (``pipelines.shard_writers``): rows handed off by the write stages, shards every
N rows and at the flush, a retried batch taken once, a failed shard write never rewriting what was written, a
lost writer failing loudly, and a real job whose dataset carries the rows' statuses only."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

import stylid_core.ledger as ledger
from jobs.config import load_job_config
from pipelines.chain import build_chain, fusion_of
from pipelines.manifest import iter_manifest
from pipelines.plan import plan_pending
from pipelines.shard_writers import ShardWriterActor, ShardWriters, batch_key, to_ipc, writers_for
from pipelines.stylize import stylize_chain
from stylid_core.ledger import ShardWriter, done_ids, iter_shards
from stylid_core.sample_data import write_face_crops
from tests.pipelines.conftest import write_manifest
from tests.test_ledger import files, ids, rows


def test_a_failed_shard_write_leaves_exactly_the_unwritten_rows(tmp_path, monkeypatch):
    """A put that fails after some shards of a batch are written: the buffer keeps only the rows not written, so
    the flush that follows (the stream failed) writes each id once."""
    out = str(tmp_path)
    writer = ShardWriter(out, {}, rows_per_shard=4)
    real, calls = ledger.write_bytes, []

    def fail_second_metrics(uri, data, opts=None):
        calls.append(uri)
        if "/metrics/" in uri and sum("/metrics/" in c for c in calls) == 2:
            raise OSError("storage unavailable")
        real(uri, data, opts)

    monkeypatch.setattr(ledger, "write_bytes", fail_second_metrics)
    with pytest.raises(OSError):
        writer.add(rows(ids(10)))  # the first shard is written, the second fails
    monkeypatch.setattr(ledger, "write_bytes", real)
    assert sorted(done_ids(out, {}).to_pylist()) == ids(4)
    writer.flush()
    got = done_ids(out, {}).to_pylist()
    assert sorted(got) == ids(10) and len(got) == 10


def test_a_writer_takes_a_retried_batch_once(tmp_path):
    out = str(tmp_path)
    actor = ShardWriterActor(out, {}, rows_per_shard=4)
    first, second = to_ipc(rows(ids(3))), to_ipc(rows(ids(3, 3)))
    k1, k2 = batch_key(ids(3)), batch_key(ids(3, 3))
    assert k1 != k2 and k1 == batch_key(list(ids(3)))
    assert actor.add(k1, first) is True
    assert actor.add(k1, first) is False  # the same batch again (a retried task): not buffered twice
    assert actor.add(k2, second) is True
    assert actor.flush() == {"rows": 6, "shards": 2, "batches": 2}
    got = done_ids(out, {}).to_pylist()
    assert sorted(got) == ids(6) and len(got) == 6
    assert writers_for(2) == 1 and writers_for(64) == 2 and writers_for(0) == 1


def test_writers_on_ray_hand_off_from_tasks_and_flush_at_the_end(ray_session, tmp_path):
    ray = ray_session
    out = str(tmp_path / "out")
    writers = ShardWriters(out, {}, rows_per_shard=5, writers=2)

    @ray.remote(num_cpus=0)
    def write_stage(batch_ids: list[str], w: ShardWriters) -> pa.Table:
        return w.hand_off(rows(batch_ids))

    batches = [ids(3, 3 * k) for k in range(8)]  # 24 rows
    returned = ray.get([write_stage.remote(b, writers) for b in batches])
    again = ray.get(write_stage.remote(batches[2], writers))  # a retry of one batch
    assert all(t.column_names == ["status"] for t in [*returned, again])
    assert sum(t.num_rows for t in returned) == 24
    before = len(done_ids(out, {}))
    assert before % 5 == 0 and before < 24  # only whole shards before the flush
    totals = writers.flush()
    assert totals["rows"] == 24 and totals["batches"] == 8
    got = done_ids(out, {}).to_pylist()
    assert sorted(got) == ids(24) and len(got) == 24
    assert files(out, "faces") == files(out, "metrics")
    faces = pa.concat_tables(list(iter_shards(out, "faces", {})))
    assert faces.num_rows == sum(rows(b).column("face_rows").combine_chunks().value_lengths().to_numpy().sum()
                                 for b in batches)  # fmt: skip
    writers.close()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(writers.actors[0].flush.remote())


def test_a_lost_writer_fails_the_flush(ray_session, tmp_path):
    """A writer is never restarted: one that died took its buffered rows with it, so the job must fail (the rows
    are in no shard, and the rerun redoes them) rather than report them done."""
    ray = ray_session
    out = str(tmp_path / "out")
    writers = ShardWriters(out, {}, rows_per_shard=100, writers=1)
    writers.hand_off(rows(ids(4)))
    # killed, and gone: ray.kill only asks, and a flush sent just after it was once still served (CI)
    writers.close()
    with pytest.raises(ray.exceptions.RayActorError):
        writers.flush()
    assert len(done_ids(out, {})) == 0


def test_a_job_dataset_carries_statuses_and_the_writers_the_rows(ray_session, tmp_path):
    """The real stylization dataset (fused actors with load and write inside): what reaches the driver is a
    status column; the metrics and face rows are in the writers' shards."""
    crops = write_face_crops(str(tmp_path / "crops"), 6)
    manifest = write_manifest(str(tmp_path / "manifest.parquet"),
                              [{"image_id": f"r{k}", "image_uri": crops[k % 6]} for k in range(20)])  # fmt: skip
    config = load_job_config("stylize_null", ["io.rows_per_shard=8", "resources.fused.batch_size=4"])
    out = str(tmp_path / "out")
    _, pending = plan_pending(iter_manifest(manifest, config.stylize.style_uri, {}), out, {}, block_rows=lambda n: 4)
    writers = ShardWriters(out, {}, rows_per_shard=8)
    try:
        dataset = build_chain(pending, stylize_chain(config, out, shard_writers=writers), fusion_of(config.resources))
        batches = list(dataset.iter_batches(batch_format="pyarrow"))
        assert {tuple(b.column_names) for b in batches} == {("status",)}
        assert sum(b.num_rows for b in batches) == 20
        assert len(done_ids(out, {})) == 16  # two full shards; 4 rows still buffered in the writer
        assert writers.flush()["rows"] == 20
    finally:
        writers.close()
    assert sorted(done_ids(out, {}).to_pylist()) == sorted(f"r{k}" for k in range(20))
    assert len(os.listdir(os.path.join(out, "images"))) == 20
    faces = pa.concat_tables(list(iter_shards(out, "faces", {})))
    assert sorted(faces.column("image_id").to_pylist()) == sorted(f"r{k}" for k in range(20))

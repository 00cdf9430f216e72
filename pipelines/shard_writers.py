"""The job's shard writers: Ray actors that own the output's metrics and faces shards while a job runs.

The write stage (``WriteStage``, alone or inside the fused actor; every job's, customize's k images a row included)
stores each image, then hands the batch's metrics rows (with their face rows, ``FACE_ROWS``) to one of these actors
and waits for its answer; what it returns into the dataset is the rows' ``status`` alone. So the rows themselves
never pass through Ray Data's output blocks, the object store or the driver: the driver sees a status column, a few
bytes a row.

Each actor runs a ``ShardWriter`` (``stylid_core.ledger``): it accumulates rows and writes a faces shard, then its
metrics shard, one put each, every ``rows_per_shard`` rows, and the rest when its input ends: the driver, which is
the one to know that the stream is over (or has failed), calls ``ShardWriters.flush``. The guarantees stay the
ledger's:

- a row reaches a writer only after its image is stored, and is done only once its metrics shard is written;
- a crash (the driver, or a writer: actors are never restarted, so its loss fails the job) loses at most the rows
  not yet flushed, which the rerun redoes, since they are in no metrics shard;
- no id twice: Ray Data retries a failed task with the same input, cut into the same batches, so a batch may
  reach a writer twice; each batch goes to the writer its ids hash to and carries that hash, and a writer takes a
  batch it has seen once (it remembers a 64-bit key a batch).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from pipelines.credentials import StageCredentials, stage_runtime_env
from stylid_core.ledger import DEFAULT_ROWS_PER_SHARD, ShardWriter, check_rows_per_shard

#: cluster CPUs a shard writer serves: a writer takes a batch in about a millisecond and writes a 5,000-row shard
#: pair in tens of ms, so one keeps up with thousands of rows a second (far more than models make on 32 CPUs)
CPUS_PER_WRITER = 32


def writers_for(cpus: float) -> int:
    """How many shard writers a cluster of ``cpus`` CPUs gets (one per ``CPUS_PER_WRITER``, at least one)."""
    return max(1, int(cpus) // CPUS_PER_WRITER)


def batch_key(ids: list[str]) -> int:
    """A batch's identity: a 64-bit hash of its ids in order (a retried task cuts the same batches)."""
    digest = hashlib.blake2b("\n".join(ids).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def to_ipc(table: pa.Table) -> bytes:
    """``table`` as an Arrow IPC stream: what a hand-off carries. Measured on 2 cores for a 64-row batch of metrics
    and face rows: 0.04 ms to encode, against about 1 ms for Ray to pickle the table, and a hand-off of 1.4 to 3 ms
    in all against 10 to 15 ms with the table as the argument."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


class ShardWriterActor:
    """One writer's state: a ``ShardWriter`` and the keys of the batches it has taken (run as a Ray actor)."""

    def __init__(self, output_uri: str, storage_options: dict | None, rows_per_shard: int,
                 credentials: StageCredentials | None = None) -> None:  # fmt: skip
        if credentials:
            credentials.export()
        self.writer = ShardWriter(output_uri, storage_options, rows_per_shard)
        self.seen: set[int] = set()

    def add(self, key: int, rows: bytes) -> bool:
        """Take a batch's rows (an Arrow IPC stream, ``to_ipc``); False (and nothing taken) when the batch came
        before. The key is recorded first: if a shard write fails, the batch's rows stay buffered, and the task's
        retry must not buffer them again."""
        if key in self.seen:
            return False
        self.seen.add(key)
        self.writer.add(pa.ipc.open_stream(rows).read_all())
        return True

    def flush(self) -> dict:
        """Write what is buffered; the writer's totals."""
        self.writer.flush()
        return {"rows": self.writer.rows_written, "shards": len(self.writer.shards), "batches": len(self.seen)}


class ShardWriters:
    """The driver's handle on a job's shard writers, and what the write stages get (it pickles as actor handles).

    Created by ``process_pending`` once there is something to do, flushed and ended by it when the stream is over.
    """

    def __init__(self, output_uri: str, storage_options: dict | None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                 writers: int = 1) -> None:  # fmt: skip
        import ray

        check_rows_per_shard(rows_per_shard)  # here, not first in an actor's constructor
        # no CPU: a writer waits on storage, and a pool that holds every CPU must not starve it; never restarted:
        # a restarted writer would have lost its buffered rows silently
        actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1, **stage_runtime_env())(ShardWriterActor)
        credentials = StageCredentials.from_environ()
        self.actors = [actor.remote(output_uri, storage_options, rows_per_shard, credentials)
                       for _ in range(max(1, writers))]  # fmt: skip

    def hand_off(self, table: pa.Table) -> pa.Table:
        """In a write stage: give ``table``'s rows (metrics plus ``FACE_ROWS``, images already stored) to their
        writer and wait until it has them; the rows' ``status`` column, for the driver's counts."""
        import ray

        if table.num_rows:
            key = batch_key(table.column("image_id").cast(pa.string()).to_pylist())
            ray.get(self.actors[key % len(self.actors)].add.remote(key, to_ipc(table)))
        return table.select(["status"])

    def flush(self) -> dict:
        """Every writer's buffered rows written (the stream is over, or failed); the totals of all writers."""
        import ray

        totals = {"rows": 0, "shards": 0, "batches": 0}
        for result in ray.get([a.flush.remote() for a in self.actors]):
            for k in totals:
                totals[k] += result[k]
        return totals

    def close(self, timeout_s: float = 60.0) -> None:
        """End the writers (after ``flush``: what they still buffer is lost), and return once each has stopped
        answering: ``ray.kill`` only asks, and a call made just after it may still be served."""
        import time

        import ray

        for a in self.actors:
            ray.kill(a)
        deadline = time.monotonic() + timeout_s
        for a in self.actors:
            while time.monotonic() < deadline:
                try:
                    ray.get(a.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    break  # gone (or, killed and hung, past waiting for)
                time.sleep(0.05)

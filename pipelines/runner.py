"""The job runner: the plan (``pipelines.plan``) under the output's writer lease, the job's dataset consumed, its
rows handed to the shard writers; one result type (``RunResult``) for every job."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from pipelines.manifest import ManifestReader
from pipelines.plan import PendingRows, plan_pending
from pipelines.shard_writers import ShardWriters, writers_for
from stylid_core import ledger
from stylid_core.lease import OutputLease
from stylid_core.ledger import DEFAULT_ROWS_PER_SHARD

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What one job's run did (``stylid run``, ``score``, ``customize``)."""

    total_rows: int
    already_done: int
    processed: int
    seconds: float
    status_counts: dict[str, int] = field(default_factory=dict)  # of the rows processed by this call

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, done: pa.ChunkedArray, counts: Counter[str], seconds: float) -> RunResult:
        """``process_pending``'s (done ids, status counts) after ``seconds``."""
        processed = sum(counts.values())
        return cls(len(done) + processed, len(done), processed, seconds, dict(counts))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_second": self.images_per_second}


def process_pending(
    manifest: ManifestReader,
    output_uri: str,
    storage_options: dict,
    build: Callable[[PendingRows, ShardWriters], ray.data.Dataset],
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    *,
    block_rows: Callable[[int], int],
) -> tuple[pa.ChunkedArray, Counter[str]]:
    """Run the rows of ``manifest`` not yet in ``output_uri``'s ledger (``plan_pending``) through
    ``build(rows, writers)``'s dataset, its rows written into shards of ``rows_per_shard`` rows by the job's shard
    writers; returns the manifest's ids already done and the status counts of the rows processed now. Rows that
    failed in an earlier run with a transient status (``ledger.RETRIED_STATUSES``: read_error, write_error) are
    taken out of the ledger first (``ledger.release_retried_rows``), so they are pending again; those whose id has
    left the manifest since keep their error row. All of it under
    the output's writer lease (``stylid_core.lease``): a second job into the same output is refused.

    ``build`` gets the pending rows as ``PendingRows``, in blocks of ``block_rows(pending rows)``, to be read as
    the dataset runs (``plan_pending``), and the job's ``ShardWriters``: its write stage hands them its metrics and
    face rows and returns their statuses, which is all that reaches this driver. The writers are flushed when the
    stream ends or fails (the rows they hold are complete: their images are stored), then ended. With nothing
    pending no dataset is built, so no stage starts, no writer and no model loads."""
    with OutputLease(output_uri, storage_options):  # one writer per output: a second run stops here, in one line
        return _process_pending(manifest, output_uri, storage_options, build, rows_per_shard, block_rows)


def _process_pending(
    manifest: ManifestReader,
    output_uri: str,
    storage_options: dict,
    build: Callable[[PendingRows, ShardWriters], ray.data.Dataset],
    rows_per_shard: int,
    block_rows: Callable[[int], int],
) -> tuple[pa.ChunkedArray, Counter[str]]:
    # a storage outage's rows are redone, those of ids the manifest still holds
    retried = ledger.release_retried_rows(output_uri, storage_options, still_wanted=manifest.present_ids)
    if retried:
        log.warning("retrying %d rows that failed with %s in an earlier run", retried,
                    "/".join(ledger.RETRIED_STATUSES))  # fmt: skip
    done, pending = plan_pending(manifest, output_uri, storage_options, block_rows)
    log.info("manifest: %d rows, %d already in the output, %d to process", len(done) + len(pending), len(done),
             len(pending))  # fmt: skip
    counts: Counter[str] = Counter()
    if len(pending):
        ledger.drop_orphan_face_shards(output_uri, storage_options)
        writers = ShardWriters(output_uri, storage_options, rows_per_shard,
                               writers_for(ray.cluster_resources().get("CPU", 1.0)))  # fmt: skip
        try:
            dataset = build(pending, writers)
            del pending  # the dataset holds them (or reads them) now
            try:
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    status = pc.value_counts(batch.column("status"))
                    counts.update(dict(zip(status.field("values").to_pylist(), status.field("counts").to_pylist())))
            finally:
                written = writers.flush()  # the rows the writers hold are complete (their images are stored)
                log.info("shard writers: %d rows in %d shards", written["rows"], written["shards"])
        finally:
            writers.close()
    return done, counts

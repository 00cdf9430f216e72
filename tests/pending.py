"""Reading a plan's pending rows in a test the way the job's read tasks read them (``ManifestSliceReader``), so
that tests check the real plan rather than a second, in-memory one."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa

from pipelines.manifest import ManifestReader
from pipelines.plan import PendingRows, plan_pending


def pending_table(rows: PendingRows) -> pa.Table:
    """All of ``rows``' pending rows, slice by slice, in manifest order."""
    parts = [rows.reader.read(s.path, s.row_groups, s.start, s.is_done) for s in rows.slices]
    if not parts:
        return pa.table({"image_id": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="permissive")


def plan_rows(reader: ManifestReader, output_uri: str, storage_options: dict | None = None):
    """``plan_pending``'s (done ids, pending rows as one table)."""
    done, rows = plan_pending(reader, output_uri, storage_options or {}, block_rows=lambda n: 10)
    return done, pending_table(rows)


def manifest_file(path, table: pa.Table | pd.DataFrame) -> str:
    """``table`` as a Parquet manifest at ``path`` (its folder made); returns the path."""
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))
    return str(path)

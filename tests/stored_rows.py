"""An output's shards as they lie on storage, for tests that check what a run left there."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stylid_core.storage import list_files, read_bytes


def stored_rows(folder: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Every row of every Parquet file directly under ``folder`` (an output's ``metrics/`` or ``faces/``), as one
    frame (empty when there are none). Every file, live or not: the jobs read the ledger's live shards only
    (``stylid_core.ledger.read_frame``: a shard a compaction replaced is skipped, a faces shard read only beside its
    metrics shard), so a test reading that way would not see an orphaned or doubled shard left on storage."""
    frames = [pq.read_table(pa.BufferReader(read_bytes(uri, storage_options))).to_pandas()
              for uri in list_files(folder, ".parquet", storage_options)]  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

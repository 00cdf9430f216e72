"""The output's shards and its resume ledger: one implementation for every job (``run``, ``customize``, ``score``).

Layout of an output (see ARCHITECTURE.md, "Shards and the ledger")::

    metrics/part-<h>.parquet   per-image rows; the resume ledger (a row is done once it is in a metrics shard)
    faces/part-<h>.parquet     per-face rows of exactly the images of metrics/part-<h>.parquet
    metrics/_compaction-part-<h>.json   only while ``compact`` replaces shards: {"shard": ..., "replaces": [...]}

``h`` is a hash of the shard's ids, so a shard's name says which rows it holds and a rerun, however it draws its
shard boundaries, never overwrites another shard. Shards hold up to ``rows_per_shard`` rows (thousands): a
``ShardWriter`` (one in each of a job's shard-writing actors, ``pipelines.shard_writers``) accumulates rows and
writes a faces shard, then its metrics shard, one put each, every ``rows_per_shard`` rows and when its input ends.

Readers never list ``faces/``: the *live* shards are the metrics shards not replaced by a committed compaction,
and a faces shard is read only beside its live metrics shard. So a faces shard left behind by a crash (written,
its metrics shard not) is never counted, and ``drop_orphan_face_shards`` removes it before its rows are redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stylid_core.storage import delete, filesystem, join, list_files, read_bytes, write_bytes

log = logging.getLogger(__name__)

METRICS = "metrics"
FACES = "faces"
#: the column in which a write stage hands each row's per-face rows (a list of structs) to its ``ShardWriter``
FACE_ROWS = "face_rows"
#: rows per metrics/faces shard: a million rows make 200 of each
DEFAULT_ROWS_PER_SHARD = 5000
#: concurrent shard reads (object stores answer one request per shard; the ledger waits on latency, not CPU)
READ_THREADS = 16
_JOURNAL = "_compaction-"


def shard_name(image_ids: Iterable[str]) -> str:
    """``part-<h>.parquet``, ``h`` a hash of the ids (the same rows always get the same name)."""
    digest = hashlib.sha256("\n".join(sorted(str(i) for i in image_ids)).encode()).hexdigest()[:16]
    return f"part-{digest}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file (written in one put)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_shard_pair(output_uri: str, faces: pa.Table, metrics: pa.Table, storage_options: dict | None) -> str:
    """The ``faces/`` shard, then the ``metrics/`` shard of the same name (the ledger entry, written last), one put
    each; returns the name. The name hashes ``metrics``' ids."""
    name = shard_name(metrics.column("image_id").to_pylist())
    write_bytes(join(output_uri, FACES, name), parquet_bytes(faces), storage_options)
    write_bytes(join(output_uri, METRICS, name), parquet_bytes(metrics), storage_options)
    return name


def split_face_rows(table: pa.Table, faces_schema: pa.Schema | None = None) -> tuple[pa.Table, pa.Table]:
    """(metrics rows, face rows) of a write stage's output: ``FACE_ROWS`` (a list of structs per row) flattened
    into a table of its own, and dropped from the metrics. A table without the column has no face rows."""
    if FACE_ROWS not in table.column_names:
        return table, (faces_schema or pa.schema([])).empty_table()
    column = table.column(FACE_ROWS).combine_chunks()
    flat = pc.list_flatten(column)
    faces = pa.Table.from_struct_array(flat)
    if faces_schema is not None:
        faces = faces.select(faces_schema.names).cast(faces_schema)
    return table.drop_columns([FACE_ROWS]), faces


def check_rows_per_shard(rows_per_shard: int) -> None:
    """``ValueError`` unless ``rows_per_shard`` is at least 1."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")


class ShardWriter:
    """Accumulates a job's output rows (a write stage's tables, with ``FACE_ROWS``) and writes a faces shard and
    then its metrics shard every ``rows_per_shard`` rows, and the rest at ``flush()``.

    A job runs it in its shard-writing actors (``pipelines.shard_writers``), which the write stages hand their rows
    to after storing the images, so a row counts as done only once its image and its metrics row are stored; a
    crash loses at most the rows not yet flushed.
    """

    def __init__(self, output_uri: str, storage_options: dict | None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD):
        check_rows_per_shard(rows_per_shard)
        self.output_uri = output_uri
        self.storage_options = storage_options
        self.rows_per_shard = rows_per_shard
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows_written = 0
        self.shards: list[str] = []

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        """Buffer ``table``'s rows; write every full shard."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.rows_per_shard:
            rest = pa.concat_tables(self._pending, promote_options="permissive")
            self._pending = [rest]
            while rest.num_rows >= self.rows_per_shard:
                self._write(rest.slice(0, self.rows_per_shard))
                # what is buffered follows each shard written: a failed write leaves exactly the unwritten rows
                rest = rest.slice(self.rows_per_shard)
                self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def flush(self) -> None:
        """Write whatever is buffered as one shard (nothing when empty)."""
        if self._pending_rows:
            self._write(pa.concat_tables(self._pending, promote_options="permissive"))
        self._pending, self._pending_rows = [], 0

    def _write(self, table: pa.Table) -> None:
        metrics, faces = split_face_rows(table)
        self.shards.append(write_shard_pair(self.output_uri, faces, metrics, self.storage_options))
        self.rows_written += metrics.num_rows


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class LedgerState:
    """What ``metrics/`` holds: live shard names, shards replaced by committed compactions, open journals."""

    live: list[str]
    replaced: set[str] = field(default_factory=set)
    journals: dict[str, dict] = field(default_factory=dict)  # journal name -> {"shard": ..., "replaces": [...]}
    present: set[str] = field(default_factory=set)  # every metrics shard on storage


def ledger_state(output_uri: str, storage_options: dict | None) -> LedgerState:
    """One listing of ``metrics/`` (plus the few compaction journals, normally none)."""
    names = [posixpath.basename(u) for u in list_files(join(output_uri, METRICS), "", storage_options)]
    present = {n for n in names if n.endswith(".parquet") and not n.startswith("_")}
    journals = {}
    for n in names:
        if n.startswith(_JOURNAL) and n.endswith(".json"):
            uri = join(output_uri, METRICS, n)
            try:
                raw = read_bytes(uri, storage_options)
            except Exception:  # deleted meanwhile: that compaction is over
                continue
            journals[n] = _checked_journal(uri, raw)
    replaced: set[str] = set()
    for j in journals.values():
        if j["shard"] in present:  # committed: its sources are superseded, whether or not deleted yet
            replaced |= set(j["replaces"])
    return LedgerState(sorted(present - replaced), replaced, journals, present)


def _is_shard_file_name(name: object) -> bool:
    """True for the bare name of a shard file in ``metrics/`` or ``faces/``: no separator, no ``..``, not a
    journal or hidden file. Joined to either folder it names a file inside the output, and only there."""
    return (
        isinstance(name, str)
        and name.endswith(".parquet")
        and not name.startswith(("_", "."))
        and not any(c in name for c in "/\\\0")
        and posixpath.basename(name) == name
    )


def _checked_journal(uri: str, raw: bytes) -> dict:
    """A compaction journal's ``{"shard": ..., "replaces": [...]}``, refused (``ValueError``) unless every name in
    it is a bare shard file name: compaction deletes what a journal names, so a planted ``../../x`` would delete a
    file outside the output."""
    try:
        journal = json.loads(raw)
    except ValueError:
        journal = None
    ok = (
        isinstance(journal, dict)
        and _is_shard_file_name(journal.get("shard"))
        and isinstance(journal.get("replaces"), list)
        and all(_is_shard_file_name(n) for n in journal["replaces"])
    )
    if not ok:
        raise ValueError(
            f"{uri}: not a compaction journal of this output (it must name shard files inside metrics/ and faces/,"
            ' as {"shard": "part-<h>.parquet", "replaces": [...]}); refusing to read or delete what it names.'
            " Remove it if no stylid compact is running"
        )
    return journal


def live_shards(output_uri: str, storage_options: dict | None) -> list[str]:
    """Names of the metrics shards that make up the ledger (each row in exactly one of them)."""
    return ledger_state(output_uri, storage_options).live


def _map_concurrent(fn: Callable, items: list, threads: int = READ_THREADS) -> Iterator:
    """``fn`` over ``items`` in order, at most ``threads`` at once and ahead (bounded memory)."""
    if len(items) <= 1 or threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items[:threads]]
        for k in range(len(items)):
            result = futures[k].result()
            futures[k] = None  # type: ignore[call-overload]
            if k + threads < len(items):
                futures.append(pool.submit(fn, items[k + threads]))
            yield result


def read_shard(uri: str, storage_options: dict | None, columns: list[str] | None = None) -> pa.Table | None:
    """One shard's ``columns`` (all when None; only those the shard has); None when the shard is gone."""
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
            return pf.read(columns=cols)
    except FileNotFoundError:
        return None


def iter_shards(
    output_uri: str,
    kind: str,
    storage_options: dict | None,
    columns: list[str] | None = None,
    names: list[str] | None = None,
    threads: int = READ_THREADS,
) -> Iterator[pa.Table]:
    """The live shards of ``kind`` (``metrics`` or ``faces``) as tables projected to ``columns``, one shard at a
    time (read ``threads`` at once), in name order; a faces shard missing beside its metrics shard is skipped."""
    names = live_shards(output_uri, storage_options) if names is None else names
    uris = [join(output_uri, kind, n) for n in names]
    for table in _map_concurrent(lambda u: read_shard(u, storage_options, columns), uris, threads):
        if table is not None:
            yield table


def read_frame(
    output_uri: str, kind: str, storage_options: dict | None, columns: list[str] | None = None
) -> pd.DataFrame:
    """The live shards of ``kind`` (``metrics`` or ``faces``) as one frame, projected to ``columns``: what a
    compaction in progress left twice is read once. For the tables a job compares whole (``stylid score``'s gate);
    summaries stream with ``iter_shards`` instead."""
    tables = list(iter_shards(output_uri, kind, storage_options, columns))
    if not tables:
        return pd.DataFrame(columns=columns or [])
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def done_ids(output_uri: str, storage_options: dict | None) -> pa.ChunkedArray:
    """Every ``image_id`` in the ledger (each once): the live metrics shards read concurrently, projected to ids."""
    chunks = [t.column("image_id").combine_chunks() for t in iter_shards(output_uri, METRICS, storage_options,
                                                                          ["image_id"])]  # fmt: skip
    return pa.chunked_array([c.cast(pa.string()) for c in chunks], type=pa.string())


def _one_array(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return ids.cast(pa.string())


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string id (pandas' SipHash of the value, ``uint64``): 8 bytes a row, for uniqueness
    checks and ledger lookups over manifests too big to hold their ids as strings (``IdSet``)."""
    values = _one_array(ids).to_numpy(zero_copy_only=False)
    return pd.util.hash_array(values, categorize=False) if len(values) else np.empty(0, np.uint64)


class IdSet:
    """Exact membership in a set of string ids (the ledger's), built once and probed batch by batch.

    Held as the ids' sorted 64-bit hashes (``id_hashes``) and the ids themselves: a probe is a binary search of
    each hash, then an exact comparison of the few rows whose hash is there (an id that only shares another's
    hash is not taken for it). ``pc.is_in``, the alternative, rebuilds its hash table of the whole value set on
    every call: against a 5M-id ledger, once per manifest batch."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        self.ids = _one_array(ids)
        hashes = id_hashes(self.ids)
        self.order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[self.order]

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, ids: pa.Array | pa.ChunkedArray, hashes: np.ndarray | None = None) -> np.ndarray:
        """A boolean mask over ``ids`` (whose ``id_hashes`` may be given): true where the id is in the set."""
        ids = _one_array(ids)
        hashes = id_hashes(ids) if hashes is None else hashes
        if not len(self.hashes) or not len(ids):
            return np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        hit = self.hashes[pos] == hashes
        rows = np.flatnonzero(hit)
        if len(rows):
            same = pc.equal(ids.take(rows), self.ids.take(self.order[pos[rows]])).to_numpy(zero_copy_only=False)
            if not same.all():  # a hash two ids share: the exact lookup, for those rows only
                other = rows[~same]
                hit[other] = pc.is_in(ids.take(other), value_set=self.ids).to_numpy(zero_copy_only=False)
        return hit


def subtract_done(ids: pa.Array | pa.ChunkedArray, done: pa.Array | pa.ChunkedArray | IdSet) -> pa.Array:
    """A boolean mask over ``ids``: true where the id is in ``done`` (the ledger's ids, or their ``IdSet``)."""
    done = done if isinstance(done, IdSet) else IdSet(done)
    return pa.array(done.contains(ids), pa.bool_())


def drop_orphan_face_shards(output_uri: str, storage_options: dict | None) -> list[str]:
    """Delete ``faces/`` shards that have no metrics shard of their name (and no compaction that will write one):
    a shard pair that crashed between its two writes. Its rows are redone, possibly into another shard, which
    would otherwise hold them twice. Returns the deleted URIs."""
    state = ledger_state(output_uri, storage_options)
    keep = state.present | {j["shard"] for j in state.journals.values()}
    dropped = []
    for uri in list_files(join(output_uri, FACES), ".parquet", storage_options):
        if posixpath.basename(uri) not in keep:
            log.info("removing %s: its rows have no metrics shard and are redone", uri)
            delete(uri, storage_options)
            dropped.append(uri)
    return dropped


# ------------------------------------------------------------------------------------------------- compaction


@dataclass
class CompactResult:
    """What one ``compact`` call did."""

    shards_before: int
    shards_after: int
    rows: int
    groups: int
    recovered: int  # interrupted compactions finished (or undone) first


def _journal_name(shard: str) -> str:
    return f"{_JOURNAL}{shard.removesuffix('.parquet')}.json"


def recover_compactions(output_uri: str, storage_options: dict | None) -> int:
    """Finish every interrupted compaction: where its new metrics shard was written (the commit), delete the
    shards it replaces; where not, delete its new faces shard. Then remove its journal. Returns how many."""
    state = ledger_state(output_uri, storage_options)
    for journal_name, j in sorted(state.journals.items()):
        if j["shard"] in state.present:
            for src in j["replaces"]:
                delete(join(output_uri, METRICS, src), storage_options)
                delete(join(output_uri, FACES, src), storage_options)
        else:
            delete(join(output_uri, FACES, j["shard"]), storage_options)
        delete(join(output_uri, METRICS, journal_name), storage_options)
    return len(state.journals)


def shard_rows(output_uri: str, names: list[str], storage_options: dict | None) -> dict[str, int]:
    """Rows of each metrics shard, from the Parquet footers (read concurrently)."""

    def rows(name: str) -> int:
        fs, path = filesystem(join(output_uri, METRICS, name), storage_options)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    return dict(zip(names, _map_concurrent(rows, names)))


def plan_compaction(rows: dict[str, int], rows_per_shard: int) -> list[list[str]]:
    """Groups of shards to merge: the shards under half of ``rows_per_shard`` rows, in name order, packed while a
    group stays within ``rows_per_shard``; groups of one are left alone.

    Every group but the last then holds more than half a shard's rows (its next shard, under half, did not fit),
    so a second compaction finds at most one small shard and does nothing: compaction is idempotent.
    """
    small = [n for n in sorted(rows) if rows[n] < rows_per_shard / 2]
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name in small:
        if current and total + rows[name] > rows_per_shard:
            groups.append(current)
            current, total = [], 0
        current.append(name)
        total += rows[name]
    if current:
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def compact_group(output_uri: str, sources: list[str], storage_options: dict | None) -> str:
    """Replace the shard pairs ``sources`` by one; the commit protocol (each step one put or delete):

    1. the new faces shard (an orphan until step 3: no reader counts it),
    2. a journal ``metrics/_compaction-<new>.json`` naming ``sources``,
    3. the new metrics shard: the commit. From here readers skip ``sources`` (the journal says they are
       replaced), so the ledger shows every row once, before, during and after,
    4. the sources' metrics and faces shards deleted,
    5. the journal deleted.

    Interrupted anywhere, ``recover_compactions`` rolls forward (after 3) or back (before 3)."""
    parts = [read_shard(join(output_uri, METRICS, s), storage_options) for s in sources]
    if any(p is None for p in parts):
        raise FileNotFoundError(f"a shard of {sources} under {output_uri}/metrics vanished during compaction")
    metrics = _concat(parts)
    faces_parts = [read_shard(join(output_uri, FACES, s), storage_options) for s in sources]
    faces_parts = [t for t in faces_parts if t is not None]
    faces = _concat(faces_parts) if faces_parts else pa.schema([("image_id", pa.string())]).empty_table()
    name = shard_name(metrics.column("image_id").to_pylist())
    write_bytes(join(output_uri, FACES, name), parquet_bytes(faces), storage_options)
    journal = {"shard": name, "replaces": sorted(sources)}
    write_bytes(join(output_uri, METRICS, _journal_name(name)), json.dumps(journal).encode(), storage_options)
    write_bytes(join(output_uri, METRICS, name), parquet_bytes(metrics), storage_options)
    for src in sources:
        delete(join(output_uri, METRICS, src), storage_options)
        delete(join(output_uri, FACES, src), storage_options)
    delete(join(output_uri, METRICS, _journal_name(name)), storage_options)
    return name


#: row statuses a rerun retries: what a storage outage or a dropped connection leaves (the storage layer's retries
#: already failed). Not retried: what the input itself is (missing, forbidden, decode_error, too_large, no_face, ...)
RETRIED_STATUSES = ("read_error", "write_error", "timeout")


def release_retried_rows(
    output_uri: str,
    storage_options: dict | None,
    statuses: Iterable[str] = RETRIED_STATUSES,
    *,
    still_wanted: Callable[[pa.Array], pa.Array | pa.ChunkedArray] | None = None,
) -> int:
    """Take the rows of ``statuses`` out of the ledger, so that the plan finds them pending and the rerun redoes
    them (once: their old rows are gone before the new ones are written); returns how many.

    ``still_wanted`` (ids -> those of them the job's manifest still holds; ``ManifestReader.present_ids``) keeps
    the rows of ids that have left the manifest since: released, they would be pending nowhere and their error
    record lost, so they stay in the ledger as they are. It is called once, with every candidate id, and only when
    there is any.

    Each live shard holding such rows is replaced by one of its other rows, with ``compact_group``'s commit
    protocol (new faces shard, journal, new metrics shard: the commit, old pair deleted, journal deleted), so an
    interruption anywhere leaves every row in the ledger once, and the next ``compact`` or rerun finishes or undoes
    it. A shard of such rows only is deleted, metrics shard first (a faces shard left alone is an orphan that the
    plan removes). Shards that an open compaction journal names are left for a later run."""
    wanted = pa.array(sorted(set(statuses)), pa.string())
    state = ledger_state(output_uri, storage_options)
    busy = {j["shard"] for j in state.journals.values()} | {n for j in state.journals.values() for n in j["replaces"]}
    names = [n for n in state.live if n not in busy]
    read = lambda n: read_shard(join(output_uri, METRICS, n), storage_options, ["image_id", "status"])  # noqa: E731
    candidates: dict[str, pa.Array] = {}  # shard -> ids of its rows of ``statuses``
    for name, table in zip(names, _map_concurrent(read, names)):
        if table is None or "status" not in table.column_names:
            continue
        retried = pc.fill_null(pc.is_in(table.column("status").cast(pa.string()), value_set=wanted), False)
        if pc.any(retried).as_py():
            candidates[name] = table.column("image_id").cast(pa.string()).filter(retried).combine_chunks()
    if not candidates:
        return 0
    if still_wanted is not None:
        keep = IdSet(_one_array(still_wanted(pa.concat_arrays(list(candidates.values())))))
        candidates = {name: ids.filter(pa.array(keep.contains(ids))) for name, ids in candidates.items()}
    released = 0
    for name, ids in candidates.items():
        if len(ids):
            released += len(ids)
            _replace_without(output_uri, name, storage_options, wanted, ids)
    return released


def _replace_without(output_uri: str, name: str, storage_options: dict | None, statuses: pa.Array,
                     ids: pa.Array) -> None:  # fmt: skip
    """The shard pair ``name`` replaced by its rows but those of ``ids`` whose status is in ``statuses`` (or
    deleted when none is left)."""
    metrics = read_shard(join(output_uri, METRICS, name), storage_options)
    if metrics is None:  # gone meanwhile
        return
    released = pc.and_(
        pc.fill_null(pc.is_in(metrics.column("status").cast(pa.string()), value_set=statuses), False),
        pc.fill_null(pc.is_in(metrics.column("image_id").cast(pa.string()), value_set=ids), False),
    )
    kept = metrics.filter(pc.invert(released))
    if not kept.num_rows:
        delete(join(output_uri, METRICS, name), storage_options)  # the ledger entry first: its rows are pending now
        delete(join(output_uri, FACES, name), storage_options)
        return
    faces = read_shard(join(output_uri, FACES, name), storage_options)
    if faces is None:
        faces = pa.schema([("image_id", pa.string())]).empty_table()
    else:
        kept_ids = kept.column("image_id").cast(pa.string())
        faces = faces.filter(pc.is_in(faces.column("image_id").cast(pa.string()), value_set=kept_ids.combine_chunks()))
    new = shard_name(kept.column("image_id").to_pylist())
    write_bytes(join(output_uri, FACES, new), parquet_bytes(faces), storage_options)
    journal = {"shard": new, "replaces": [name]}
    write_bytes(join(output_uri, METRICS, _journal_name(new)), json.dumps(journal).encode(), storage_options)
    write_bytes(join(output_uri, METRICS, new), parquet_bytes(kept), storage_options)
    delete(join(output_uri, METRICS, name), storage_options)
    delete(join(output_uri, FACES, name), storage_options)
    delete(join(output_uri, METRICS, _journal_name(new)), storage_options)


def compact(
    output_uri: str, storage_options: dict | None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
) -> CompactResult:
    """Rewrite an output's small metrics and faces shards (earlier versions wrote one per compute batch; many
    small reruns leave many small shards) into shards of up to ``rows_per_shard`` rows. Idempotent, and safe to
    interrupt at any point: the ledger shows every row exactly once throughout (see ``compact_group``)."""
    if rows_per_shard < 2:
        raise ValueError(f"rows_per_shard must be >= 2, got {rows_per_shard}")
    recovered = recover_compactions(output_uri, storage_options)
    drop_orphan_face_shards(output_uri, storage_options)
    names = live_shards(output_uri, storage_options)
    rows = shard_rows(output_uri, names, storage_options)
    groups = plan_compaction(rows, rows_per_shard)
    for group in groups:
        compact_group(output_uri, group, storage_options)
    after = len(names) - sum(len(g) for g in groups) + len(groups)
    return CompactResult(len(names), after, sum(rows.values()), len(groups), recovered)

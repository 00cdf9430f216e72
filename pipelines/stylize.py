"""The stylization dataset: manifest -> prepare -> load -> faces -> stylize -> score -> write.

``run_stylize`` reads the manifest on the driver in bounded Arrow batches (only its id, URI and style columns),
validates it, subtracts the rows already in the output (the resume ledger: ``stylid_core.ledger``) and streams the
rest through the stages, whose write stage hands the rows to the job's shard writers (``pipelines.shard_writers``),
which write them into shards of ``io.rows_per_shard`` rows. A run with
nothing left to do starts no stage and loads no model.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import ActorPoolStrategy, Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipelines.credentials import StageCredentials, stage_runtime_env, with_credentials
from pipelines.shard_writers import ShardWriters, writers_for
from pipelines.stages import (
    SOURCE_IMAGE,
    FaceStage,
    FusedCPUStage,
    ImageColumn,
    LoadStage,
    ScoreStage,
    StylizeStage,
    WriteStage,
    prepare_manifest,
)
from stylid_core import ledger
from stylid_core.config import ConfigError, JobConfig, StageResources
from stylid_core.lease import OutputLease
from stylid_core.ledger import DEFAULT_ROWS_PER_SHARD
from stylid_core.storage import DEFAULT_RETRY, arrow_filesystem, is_transient, with_retries

log = logging.getLogger(__name__)


DERIVED_ID_HINT = "rows without one get a hash of image_uri, so a URI listed twice is a duplicate too"
#: manifest rows read and prepared at a time on the driver
MANIFEST_BATCH_ROWS = 65_536


def _manifest_dataset(
    manifest_uri: str, required: str, storage_options: dict | None, files: list[str] | None = None
) -> pads.Dataset:
    afs, path = arrow_filesystem(manifest_uri, storage_options)
    if files is not None:  # these Parquet files under the prefix, in this order, rather than all of them
        path = [posixpath.join(path, name) for name in files]

    def open_dataset() -> pads.Dataset:
        dataset = pads.dataset(path, filesystem=afs, format="parquet")
        # a prefix's files may differ in their optional columns: the dataset's schema is all of theirs (pyarrow
        # takes the first file's), each footer read concurrently
        fragments = list(dataset.get_fragments())
        if len(fragments) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(fragments))) as pool:
                schemas = list(pool.map(lambda f: f.physical_schema, fragments))
            dataset = pads.dataset(path, filesystem=afs, format="parquet", schema=pa.unify_schemas(schemas))
        return dataset

    try:  # an unreachable endpoint is retried like any storage call, then one line naming the manifest
        dataset = with_retries(open_dataset, f"read manifest {manifest_uri}")
    except (FileNotFoundError, OSError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"cannot read manifest {manifest_uri}: {exc}") from None
    except Exception as exc:  # botocore's and aiohttp's connection errors are not OSErrors
        again = f" (still failing after {DEFAULT_RETRY.attempts} tries)" if is_transient(exc) else ""
        raise ValueError(f"cannot read manifest {manifest_uri}: {type(exc).__name__}: {exc}{again}") from None
    if required not in dataset.schema.names:
        raise ValueError(
            f"manifest {manifest_uri} has no '{required}' column (columns: {sorted(dataset.schema.names)})"
        )
    return dataset


def read_manifest_file(
    filesystem,
    path: str,
    row_groups: list[int] | None,
    target: list[pa.Field],
    batch_rows: int,
    prepare: Callable[[pa.Table], pa.Table],
    start: int = 0,
    stop: int | None = None,
    version: tuple | None = None,
) -> Iterator[pa.Table]:
    """One manifest file's ``target`` columns (those it has; a column it lacks is null), of ``row_groups`` (all
    when None), rows ``start`` to ``stop`` of those (all when None; the rows before ``start`` are decoded, not
    prepared), in batches of at most ``batch_rows``, each ``prepare``d: the one reading rule of the plan's both
    passes and of ``PendingRows``' read tasks.

    Read with ``ParquetFile.iter_batches``, which decodes page by page: the dataset scanner decodes a whole row
    group per column before it slices it (measured: a 1M-row row group of ids and URIs, +138 MB of driver RSS in
    the scanner, +48 MB page by page).

    ``version`` (``file_version`` when the plan began): ``RuntimeError`` if the file is another version now. The
    plan marks done rows by their position, so a manifest rewritten between the plan and the read (the same rows
    in another order) would have done rows run again and pending ones skipped."""

    def opened():
        if version is not None:
            now = file_version(filesystem, path)
            if now != version:
                raise RuntimeError(f"manifest {path} changed while it was read: rewritten after the plan (mtime_ns,"
                                   f" size: {version}, now {now}); rerun to plan again")  # fmt: skip
        return filesystem.open_input_file(path)

    # the version check and the open are metadata calls a flaky store may fail (503, throttling): retried
    with with_retries(opened, f"read manifest {path}") as fh:
        parquet = pq.ParquetFile(fh)
        present = set(parquet.schema_arrow.names)
        names = [f.name for f in target if f.name in present]
        offset = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=names,
                                          use_threads=False):  # fmt: skip
            first, offset = offset, offset + batch.num_rows
            if offset <= start:
                continue
            batch = batch.slice(max(0, start - first), None if stop is None else max(0, stop - max(first, start)))
            if not batch.num_rows:
                continue
            table = pa.table({
                f.name: batch.column(f.name).cast(f.type) if f.name in present else pa.nulls(batch.num_rows, f.type)
                for f in target
            })  # fmt: skip
            yield prepare(table)
            if stop is not None and offset >= stop:
                return


def file_version(filesystem, path: str) -> tuple:
    """(modification time in ns, size) of a manifest file: what changes when it is rewritten."""
    info = filesystem.get_file_info(path)
    return (info.mtime_ns, info.size)


def encode_styles(table: pa.Table) -> pa.Table:
    """``style_uri`` dictionary-encoded: one style serves most rows, kept once per batch instead of once per row."""
    if "style_uri" not in table.column_names:
        return table
    k = table.column_names.index("style_uri")
    return table.set_column(k, "style_uri", pc.dictionary_encode(table.column("style_uri")))


class ManifestReader:
    """A Parquet manifest (a file or a prefix of many) read by pyarrow in batches of ``batch_rows``, projected to
    ``image_id``, ``image_uri`` and ``style_uri``, each batch prepared (``prepare_manifest``); iterable any number
    of times. ``ValueError`` for a missing manifest or no ``image_uri`` column at construction.

    ``scan_ids()`` is one pass over the ids only, checked unique by their 64-bit hashes and looked up in the
    ledger's ids; ``plan_pending`` then keeps, in a second pass, only the pending rows, so the driver never holds the
    whole manifest, nor even its ids (ten million rows: 9 bytes a row, the hash and the done flag).

    ``stylid customize`` reads its manifest with the same reader (``pipelines.customize.iter_customize_manifest``):
    its own ``required`` column, ``columns``, ``id_columns`` (what a derived id depends on) and ``prepare``
    (manifest batch -> prepared rows); ``id_hint`` says how its ids are derived. ``files`` (names relative to
    ``manifest_uri``) reads those Parquet files only: ``stylid score`` reads an output folder's live metrics shards
    (``pipelines.score.iter_output_pairs``)."""

    def __init__(
        self,
        manifest_uri: str,
        default_style_uri: str | None,
        storage_options: dict | None = None,
        batch_rows: int = MANIFEST_BATCH_ROWS,
        *,
        required: str = "image_uri",
        columns: tuple[str, ...] = ("image_id", "image_uri", "style_uri"),
        id_columns: tuple[str, ...] = ("image_id", "image_uri"),
        prepare: Callable[[pa.Table], pa.Table] | None = None,
        id_hint: str = DERIVED_ID_HINT,
        files: list[str] | None = None,
    ) -> None:
        self.manifest_uri = manifest_uri
        self.default_style_uri = default_style_uri
        self.batch_rows = batch_rows
        self.columns, self.id_columns, self.id_hint = columns, id_columns, id_hint
        self.prepare = prepare or (lambda table: prepare_manifest(table, default_style_uri))
        self.dataset = _manifest_dataset(manifest_uri, required, storage_options, files)
        # each file's version as the plan begins: every later read of it checks it is the same file
        paths = [fragment.path for fragment in self.dataset.get_fragments()]
        fs = self.dataset.filesystem
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
            self.versions = dict(zip(paths, pool.map(lambda path: file_version(fs, path), paths)))
        for column in self._target(columns):  # a list or struct column cannot be cast to ids and URIs
            if pa.types.is_nested(column.type):
                raise ValueError(
                    f"manifest {manifest_uri}: column '{column.name}' is of type {column.type}; it must hold one"
                    " string per row"
                )

    def _target(self, columns: tuple[str, ...]) -> list[pa.Field]:
        """The fields of ``columns`` the manifest has, typed as its unified schema."""
        schema = self.dataset.schema
        return [schema.field(c) for c in columns if c in schema.names]

    def _batches(self, columns: tuple[str, ...]) -> Iterator[pa.Table]:
        """The manifest's ``columns`` (those it has), file by file, in batches of at most ``batch_rows``, typed as
        the dataset's unified schema (a column a file lacks is null there), each ``prepare``d
        (``read_manifest_file``)."""
        target = self._target(columns)
        for fragment in self.dataset.get_fragments():
            yield from read_manifest_file(self.dataset.filesystem, fragment.path, None, target, self.batch_rows,
                                          self.prepare, version=self.versions.get(fragment.path))  # fmt: skip

    def row_groups(self) -> list[tuple[str, int, int]]:
        """(file, row group index, rows) of every row group, in the order ``_batches`` reads them; the files'
        footers read concurrently (``Fragment.metadata``)."""
        fragments = list(self.dataset.get_fragments())
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(fragments)))) as pool:
            metadata = list(pool.map(lambda f: f.metadata, fragments))
        return [
            (fragment.path, k, meta.row_group(k).num_rows)
            for fragment, meta in zip(fragments, metadata)
            for k in range(meta.num_row_groups)
        ]

    def __iter__(self) -> Iterator[pa.Table]:
        for table in self._batches(self.columns):
            yield encode_styles(table)

    def scan_ids(self, done: ledger.IdSet | None = None) -> ManifestIds:
        """One pass over the ids: checked unique (``ValueError`` naming a few duplicates), and with ``done`` (the
        ledger's ids) which rows are in it.

        The pass keeps 8 bytes a row, the ids' 64-bit hashes (``ledger.id_hashes``), never the ids themselves; two
        rows sharing a hash are told apart by a second pass over the ids of those hashes only."""
        hashes, is_done, done_ids = [], [], []
        for ids in self._ids():
            batch_hashes = ledger.id_hashes(ids)
            hashes.append(batch_hashes)
            mask = done.contains(ids, batch_hashes) if done is not None else np.zeros(len(ids), bool)
            is_done.append(mask)
            if mask.any():
                done_ids.append(ids.filter(pa.array(mask)))
        all_hashes = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        del hashes
        self._check_unique(all_hashes)
        return ManifestIds(
            is_done=np.concatenate(is_done) if is_done else np.zeros(0, bool),
            done=pa.chunked_array(done_ids, pa.string()),
        )

    def _ids(self) -> Iterator[pa.Array]:
        """Each batch's prepared ``image_id``s, as one string array."""
        for table in self._batches(self.id_columns):
            yield table.column("image_id").combine_chunks().cast(pa.string())

    def _check_unique(self, hashes: np.ndarray) -> None:
        hashes.sort()
        shared = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if not len(shared):
            return
        # a hash shared by rows: read those rows' ids again and compare them as strings
        suspects = [ids.filter(pa.array(np.isin(ledger.id_hashes(ids), shared))) for ids in self._ids()]
        check_unique_ids(pa.chunked_array(suspects, pa.string()), self.manifest_uri, self.id_hint)


@dataclass
class ManifestIds:
    """What one pass over a manifest's ids found (``ManifestReader.scan_ids``)."""

    #: per row, in manifest order: its id is in the ledger given
    is_done: np.ndarray
    #: the ids of those rows
    done: pa.ChunkedArray

    @property
    def rows(self) -> int:
        return len(self.is_done)

    @property
    def pending(self) -> int:
        return self.rows - int(self.is_done.sum())


def iter_manifest(
    manifest_uri: str,
    default_style_uri: str | None,
    storage_options: dict | None = None,
    batch_rows: int = MANIFEST_BATCH_ROWS,
) -> ManifestReader:
    """The manifest's prepared rows in batches (``ManifestReader``), for ``process_pending``."""
    return ManifestReader(manifest_uri, default_style_uri, storage_options, batch_rows)


def read_manifest(manifest_uri: str, default_style_uri: str | None, storage_options: dict | None = None) -> pa.Table:
    """The whole prepared manifest as one Arrow table (``iter_manifest``'s batches); ``stylid run`` streams them
    into ``process_pending`` instead, which keeps only the pending rows."""
    reader = ManifestReader(manifest_uri, default_style_uri, storage_options)
    parts = list(reader._batches(("image_id", "image_uri", "style_uri")))
    if not parts:
        return prepare_manifest(pa.table({"image_uri": pa.array([], pa.string())}), default_style_uri)
    table = pa.concat_tables(parts)
    check_unique_ids(table, manifest_uri, DERIVED_ID_HINT)
    return table


def check_unique_ids(rows: pd.DataFrame | pa.Table | pa.ChunkedArray, manifest_uri: str, hint: str) -> None:
    """``ValueError`` naming a few duplicates when the ``image_id``s (a frame's or table's column, or the ids
    themselves) are not unique; an Arrow hash count, no Python set."""
    if isinstance(rows, pd.DataFrame):
        ids = pa.chunked_array([pa.array(rows["image_id"].astype(object), pa.string())], pa.string())
    else:
        ids = rows if isinstance(rows, (pa.ChunkedArray, pa.Array)) else rows.column("image_id")
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    # unique() of one array: measured here on 10M ids, a fraction of the time and memory of count_distinct or of
    # unique() over many chunks
    if len(pc.unique(ids)) == len(ids):
        return
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    raise ValueError(
        f"manifest {manifest_uri} has {len(dupes)} duplicate image_id(s), e.g. {dupes[:5]}; image_id must be"
        f" unique ({hint})"
    )


def _pool(res: StageResources, total_cpus: float, total_gpus: float) -> ActorPoolStrategy:
    if res.pool_size:
        return ActorPoolStrategy(size=res.pool_size)
    if res.num_gpus > 0:
        limit = total_gpus / res.num_gpus
    else:
        limit = total_cpus / max(res.num_cpus, 0.01)
    return ActorPoolStrategy(min_size=1, max_size=max(1, int(limit)))


def check_pools_fit(
    pools: dict[str, StageResources], tasks: dict[str, float], cpus: float, gpus: float, memory: float | None = None
) -> None:
    """Every actor pool's first actors (``pool_size``, at least one) must fit at once beside one task of each
    stateless step (``tasks``: name -> CPUs); otherwise Ray Data waits forever for the pool that cannot start.
    Raise ``ConfigError`` with the numbers instead. ``memory``: the cluster's memory resource in bytes, checked
    against the pools' declared ``memory_mb`` when given."""
    need_cpu = sum(r.num_cpus * max(1, r.pool_size) for r in pools.values()) + sum(tasks.values())
    need_gpu = sum(r.num_gpus * max(1, r.pool_size) for r in pools.values())
    need_mem = sum(r.memory_mb * max(1, r.pool_size) for r in pools.values()) * 2**20
    if memory is not None and need_mem > memory:
        detail = ", ".join(
            f"{k}: {r.memory_mb:g} MiB x {max(1, r.pool_size)}" for k, r in pools.items() if r.memory_mb
        )
        raise ConfigError(
            f"the stages declare {need_mem / 2**30:.2f} GiB of memory to run at once ({detail}) but the Ray cluster"
            f" has {memory / 2**30:.2f} GiB; lower resources.<stage>.memory_mb or pool_size, or lower"
            " io.max_work_pixels with them"
        )
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        gpu = lambda r: f" + {r.num_gpus:g} GPU" if r.num_gpus else ""  # noqa: E731
        detail = ", ".join(
            [f"{k}: {r.num_cpus:g} CPU{gpu(r)} x {max(1, r.pool_size)}" for k, r in pools.items()]
            + [f"{k} {c:g}" for k, c in tasks.items()]
        )
        raise ConfigError(
            f"the stages need {need_cpu:g} CPU(s) and {need_gpu:g} GPU(s) to run at once ({detail}) but the Ray"
            f" cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s); lower resources.<stage>.num_cpus / num_gpus /"
            " pool_size"
        )


def _check_fits(
    config: JobConfig, cpus: float, gpus: float, stylize: bool = True, memory: float | None = None
) -> None:
    res = config.resources
    pools = {"fused": res.fused} if fused(config) else {"faces": res.faces, "stylize": res.stylize, "score": res.score}
    if not stylize:
        pools.pop("stylize", None)
    tasks = {} if fused_io(config) else {"load": res.load.num_cpus, "write": res.write.num_cpus}
    check_pools_fit(pools, tasks, cpus, gpus, memory)


def stage_remote_args() -> dict:
    """``ray_remote_args`` for every stage: the driver's non-secret environment (``pipelines.credentials``);
    credentials go through ``with_credentials`` / the task functions' ``credentials`` argument instead."""
    return stage_runtime_env()


def fused(config: JobConfig) -> bool:
    """Whether faces, stylize and score run as one CPU actor pool (``resources.fuse_cpu_stages``, no GPU asked)."""
    res = config.resources
    return res.fuse_cpu_stages and not any(r.num_gpus > 0 for r in (res.faces, res.stylize, res.score))


def fused_io(config: JobConfig) -> bool:
    """Whether the fused pool also loads and writes (``resources.fuse_io``): the whole job is then one operator."""
    return fused(config) and config.resources.fuse_io


def fused_pool_size(config: JobConfig, cpus: float, memory: float | None = None) -> int:
    """Actors of the fused pool: ``pool_size``, else as many as the CPUs left beside load and write tasks allow,
    at most one per CPU (each actor is single-threaded CPU work; more would only hold more models in memory), and
    no more than the cluster's ``memory`` (bytes) holds at the declared ``memory_mb`` each."""
    res = config.resources
    if res.fused.pool_size:
        return res.fused.pool_size
    spare = cpus if fused_io(config) else cpus - res.load.num_cpus - res.write.num_cpus
    size = min(int(spare / res.fused.num_cpus + 1e-9), int(cpus + 1e-9))
    if memory is not None and res.fused.memory_mb > 0:
        size = min(size, int(memory / (res.fused.memory_mb * 2**20)))
    return max(1, size)


def _load(df, io, images=SOURCE_IMAGE, credentials: StageCredentials | None = None):
    if credentials:
        credentials.export()
    return LoadStage(io, images)(df)


def _write(df, credentials: StageCredentials | None = None, **kwargs):
    if credentials:
        credentials.export()
    return WriteStage(**kwargs)(df)


#: the most input blocks a job's rows are cut into (below 4 a CPU): the driver's memory per block is per run
MAX_INPUT_BLOCKS = 500


def input_block_rows(num_rows: int, first_batch: int, cpus: float) -> int:
    """Rows of each of a job's input blocks (``input_blocks``, and ``plan_pending``'s blocks put as it plans).

    An actor takes a whole block: blocks as small as the first stage's batches (``first_batch``) keep every actor
    busy to the end, and a job of fewer rows than the actors' batches hold is split so that each CPU still gets some;
    but no more than ``MAX_INPUT_BLOCKS`` (4 a CPU on big clusters): each block costs the driver about 40 kB for the
    whole run (measured: 157 blocks +35 MB, 1,563 blocks +94 MB), so 64-row blocks made its RSS grow with the rows;
    500 blocks of a million rows are 2,000 rows each, a few seconds of an actor."""
    per_cpu = -(-num_rows // max(1, int(cpus)))
    max_blocks = max(MAX_INPUT_BLOCKS, 4 * int(cpus))
    return max(min(first_batch, per_cpu), -(-num_rows // max_blocks), 1)


def input_blocks(rows: pa.Table | pd.DataFrame, first_batch: int, cpus: float) -> list[pa.Table]:
    """A job's rows cut into Ray's input blocks of ``input_block_rows`` rows (``ray.data.from_arrow``), for every
    job (``stylid run``, ``score``, ``customize``, the customizer's training pairs). The blocks are slices sharing
    ``rows``' buffers; Ray serializes a slice's own rows only."""
    if isinstance(rows, pd.DataFrame):
        rows = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    return list(block_slices(rows, input_block_rows(len(rows), first_batch, cpus)))


def block_slices(table: pa.Table, block_rows: int) -> Iterator[pa.Table]:
    """``table`` cut into consecutive slices of ``block_rows`` rows (the last may be shorter), sharing its buffers:
    Ray serializes a slice's own rows only."""
    for k in range(0, table.num_rows, block_rows):
        yield table.slice(k, block_rows)


def keep_pending(tables: Iterable[pa.Table], is_done: np.ndarray, where: str) -> Iterator[pa.Table]:
    """Each table's rows not marked in ``is_done`` (the done flags of those tables' rows, in order): the plan's
    second pass and ``PendingRows``' read tasks. ``RuntimeError`` naming ``where`` when the tables hold other
    rows than the flags (the manifest changed since its ids were read)."""
    offset = 0
    for table in tables:
        mask = is_done[offset : offset + table.num_rows]
        offset += table.num_rows
        yield table.filter(pa.array(~mask))
    if offset != len(is_done):
        raise RuntimeError(f"manifest {where} changed while it was read ({len(is_done)} rows planned, {offset} read)")


@dataclass
class _PendingSlice:
    """One read task's share of ``PendingRows``: consecutive rows of one manifest file (its ``row_groups``, from
    row ``start`` of the first, ``len(is_done)`` rows) and their done flags (a view of the plan's: pickled, a view
    carries its own rows only)."""

    path: str
    row_groups: list[int]
    start: int
    is_done: np.ndarray

    @property
    def pending(self) -> int:
        return len(self.is_done) - int(self.is_done.sum())

    def pieces(self, block_rows: int) -> list[pa.Table]:
        """This slice cut into consecutive row ranges of ``block_rows`` pending rows each (the last fewer), each as
        a one-row ``PIECE_SCHEMA`` table: the file, its row groups, the range and the range's done flags (packed,
        a bit a row): what a block of the job's rows is when its first stage reads its own rows
        (``ManifestSliceReader.read_piece``)."""
        pending_at = np.flatnonzero(~self.is_done)
        cuts = [0, *pending_at[block_rows::block_rows].tolist(), len(self.is_done)]
        return [
            pa.table({
                "path": [self.path], "row_groups": [self.row_groups], "start": [self.start + lo],
                "stop": [self.start + hi], "done": [np.packbits(self.is_done[lo:hi]).tobytes()],
            }, schema=PIECE_SCHEMA)
            for lo, hi in zip(cuts[:-1], cuts[1:])
        ]  # fmt: skip


#: a block of a job's rows not read yet (``_PendingSlice.pieces``): rows ``start`` to ``stop`` of a manifest
#: file's ``row_groups``, and a bit a row, set when that row is done already
PIECE_SCHEMA = pa.schema([("path", pa.string()), ("row_groups", pa.list_(pa.int64())), ("start", pa.int64()),
                          ("stop", pa.int64()), ("done", pa.binary())])  # fmt: skip


class _Cursor:
    """Where one open read of a manifest file's row groups stands: the prepared tables still to come, the row
    the next of them starts at, and what is left of the last one taken."""

    def __init__(self, tables: Iterator[pa.Table], position: int) -> None:
        self.tables, self.position, self.head = tables, position, None

    def take(self, start: int, stop: int) -> list[pa.Table]:
        """Rows ``start`` to ``stop`` (``start`` at or after ``position``; fewer if the file ends first)."""
        taken = []
        while self.position < stop:
            if self.head is None:
                self.head = next(self.tables, None)
                if self.head is None:
                    break
            end = self.position + self.head.num_rows
            lo, hi = max(start, self.position), min(stop, end)
            if hi > lo:
                taken.append(self.head.slice(lo - self.position, hi - lo))
            if end <= stop:
                self.head, self.position = None, end
            else:
                self.head, self.position = self.head.slice(stop - self.position), stop
        return taken


class ManifestSliceReader:
    """Reads a job's pending rows out of its manifest, a slice or a piece at a time: ``PendingRows``' read
    tasks, and the fused actors that read their own rows (``FusedCPUStage`` with ``read_piece``).

    An actor is given a slice's pieces in order, every other one or so when two actors share it: a read stays open
    between pieces (``_Cursor``, the last ``OPEN_READS`` of them) and goes on from where the last piece ended, so
    a row group is decoded about once an actor, not once a piece (Parquet has no row-level seek). Pickled, a
    reader carries its settings, not its open reads."""

    #: open reads an instance keeps (a few: the slices whose pieces its actor is being given)
    OPEN_READS = 2

    def __init__(self, filesystem, target: list[pa.Field], batch_rows: int, prepare, manifest_uri: str,
                 versions: dict[str, tuple] | None = None) -> None:  # fmt: skip
        self.filesystem, self.target, self.batch_rows, self.prepare = filesystem, target, batch_rows, prepare
        self.manifest_uri = manifest_uri
        self.versions = versions or {}  # path -> file_version when the plan began
        self._open: dict[tuple, _Cursor] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def read(self, path: str, row_groups: list[int], start: int, is_done: np.ndarray) -> pa.Table:
        """Rows ``start`` to ``start + len(is_done)`` of ``path``'s ``row_groups``, less those marked in
        ``is_done``, styles dictionary-encoded. ``RuntimeError`` when the file holds fewer rows there (the
        manifest changed since the plan)."""
        stop = start + len(is_done)
        key = (path, tuple(row_groups))
        cursor = self._open.pop(key, None)
        if cursor is None or cursor.position > start:
            tables = read_manifest_file(self.filesystem, path, row_groups, self.target, self.batch_rows,
                                        self.prepare, start=start, version=self.versions.get(path))  # fmt: skip
            cursor = _Cursor(tables, start)
        taken = cursor.take(start, stop)
        self._open[key] = cursor  # the newest last: the oldest goes first
        while len(self._open) > self.OPEN_READS:
            self._open.pop(next(iter(self._open)))
        # keep_pending raises when the file held fewer rows than planned, so there is at least one table here
        kept = list(keep_pending(taken, is_done, f"{self.manifest_uri} ({path} from row {start})"))
        # permissive: a prepared column all null in one batch (null type) is typed by the others
        return encode_styles(pa.concat_tables(kept, promote_options="permissive").combine_chunks())

    def read_piece(self, piece: dict) -> pa.Table:
        """A ``PIECE_SCHEMA`` row's pending rows (``read``)."""
        rows = piece["stop"] - piece["start"]
        is_done = np.unpackbits(np.frombuffer(piece["done"], np.uint8), count=rows).astype(bool)
        return self.read(piece["path"], list(piece["row_groups"]), piece["start"], is_done)


class PendingRows(Datasource):
    """A plan's pending rows, not read yet (``plan_pending`` with ``block_rows``): the manifest's rows cut into
    slices of at most a manifest batch (``batch_rows``) of one file, each with its rows' done flags (a slice whose
    rows are all done is not kept), and each slice into pieces of about ``block_rows`` pending rows.

    Read as the dataset runs, in one of two ways:

    - ``dataset()``: Ray Data's read tasks, one a slice, its rows cut into blocks of about ``block_rows``
      (``read_datasource``). Ray pulls them only as fast as the first stage takes them (a read task is a
      streaming generator, paused while its blocks wait), so neither the driver nor the object store ever holds
      the pending rows. Read tasks take no CPU (``num_cpus=0``): a batch is read and filtered in milliseconds,
      and an actor pool that holds every CPU must not starve its own input.
    - ``pieces_dataset()``: the pieces themselves, a few hundred bytes each, for a first stage that reads its own
      rows (the fused actors, ``FusedCPUStage`` with ``read_piece``): the rows then never cross the object
      store at all. A block of rows is bigger than Ray inlines (100 kB): each is a shared-memory object the
      actor maps, and the store's pages an actor had touched grew with the run (a million rows: +44 MB an
      actor); inlined blocks pass through the driver instead, whose heap then grew about as much.

    Small row groups of one file share a slice; a row group bigger than a batch is cut into several slices,
    each decoding the group up to its own rows (Parquet has no row-level seek): a 1M-row group is 16 slices
    decoding 8.5M rows in all, seconds against the hours of its rows' models."""

    def __init__(self, manifest: ManifestReader, is_done: np.ndarray, block_rows: int) -> None:
        self.reader = ManifestSliceReader(manifest.dataset.filesystem, manifest._target(manifest.columns),
                                          manifest.batch_rows, manifest.prepare, manifest.manifest_uri,
                                          manifest.versions)  # fmt: skip
        self.batch_rows = manifest.batch_rows
        self.manifest_uri = manifest.manifest_uri
        self.block_rows = block_rows
        self.slices = self._slices(manifest.row_groups(), is_done)
        self.num_rows = sum(part.pending for part in self.slices)

    def _slices(self, groups: list[tuple[str, int, int]], is_done: np.ndarray) -> list[_PendingSlice]:
        total = sum(rows for _, _, rows in groups)
        if total != len(is_done):
            raise RuntimeError(f"manifest {self.manifest_uri} changed while it was read "
                               f"({len(is_done)} rows, now {total})")  # fmt: skip
        # consecutive rows of one file a task: small row groups joined up to a batch, a big one cut into batches
        slices: list[_PendingSlice] = []
        offset = 0  # the manifest's rows before this group
        for path, group, rows in groups:
            last = slices[-1] if slices else None
            if (last and last.path == path and last.start == 0 and rows <= self.batch_rows
                    and len(last.is_done) + rows <= self.batch_rows):  # fmt: skip
                last.row_groups.append(group)
                last.is_done = is_done[offset - len(last.is_done) : offset + rows]
            else:
                step = self.batch_rows
                slices += [_PendingSlice(path, [group], k, is_done[offset + k : offset + min(rows, k + step)])
                           for k in range(0, rows, step)]  # fmt: skip
            offset += rows
        return [part for part in slices if not part.is_done.all()]  # a task whose rows are all done is not made

    def __len__(self) -> int:
        return self.num_rows

    #: a pending row in Arrow, for Ray's estimates: its id, URI and a dictionary-encoded style
    ROW_BYTES = 200

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * self.ROW_BYTES

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        credentials = StageCredentials.from_environ()
        tasks = []
        for part in self.slices:
            meta = BlockMetadata(num_rows=part.pending, size_bytes=part.pending * self.ROW_BYTES, exec_stats=None,
                                 input_files=(part.path,))  # fmt: skip
            tasks.append(ReadTask(self._read_task(part, credentials), meta))
        return tasks

    def _read_task(self, part: _PendingSlice, credentials: StageCredentials) -> Callable[[], Iterator[pa.Table]]:
        reader = self.reader

        def read() -> Iterator[pa.Table]:
            credentials.export()
            yield reader.read(part.path, part.row_groups, part.start, part.is_done)

        return read

    def dataset(self) -> ray.data.Dataset:
        """The pending rows as a Ray dataset read as it runs (one read task a slice, no CPU each), in blocks of
        about ``block_rows`` (``override_num_blocks``: each task's rows split in as many blocks; Ray joins the
        tables a task yields up to its block size, so yielding pieces would not cut them)."""
        blocks = max(len(self.slices), -(-self.num_rows // max(1, self.block_rows)))
        return ray.data.read_datasource(self, override_num_blocks=blocks, num_cpus=0, **stage_runtime_env())

    def pieces_dataset(self) -> ray.data.Dataset:
        """The pending rows' pieces (``PIECE_SCHEMA``) as a Ray dataset, a block a piece, in manifest order: for
        a first stage that reads its own rows with ``reader``."""
        pieces = [piece for part in self.slices for piece in part.pieces(self.block_rows)]
        return ray.data.from_arrow(pieces)


@dataclass
class PendingBlocks:
    """Rows already in Ray's object store, one ref a block, put batch by batch so that the driver never holds
    them all (``ray.data.from_arrow_refs``): the customizer's training pairs (``pair_blocks``)."""

    refs: list = field(default_factory=list)
    num_rows: int = 0

    def __len__(self) -> int:
        return self.num_rows

    def put(self, table: pa.Table, block_rows: int) -> None:
        """Put ``table``'s rows into the object store as blocks of at most ``block_rows`` (Ray initialised)."""
        self.refs += [ray.put(block) for block in block_slices(table, block_rows)]
        self.num_rows += table.num_rows


#: what a job's first dataset is made of (``input_dataset``)
InputRows = pa.Table | pd.DataFrame | PendingRows | PendingBlocks


def input_dataset(rows: InputRows, first_batch: int, cpus: float) -> ray.data.Dataset:
    """A job's first dataset: ``PendingRows`` read as it runs, ``PendingBlocks`` as they are, rows in memory cut
    into ``input_blocks``."""
    if isinstance(rows, PendingRows):
        return rows.dataset()
    if isinstance(rows, PendingBlocks):
        return ray.data.from_arrow_refs(rows.refs)
    return ray.data.from_arrow(input_blocks(rows, first_batch, cpus))


def first_batch_rows(config: JobConfig) -> int:
    """The batch size of a job's first stage with a model (the fused pool's, else the faces stage's)."""
    return config.resources.fused.batch_size if fused(config) else config.resources.faces.batch_size


def build_dataset(
    config: JobConfig,
    rows: InputRows,
    output_uri: str,
    *,
    stylize: bool = True,
    images: tuple[ImageColumn, ...] = SOURCE_IMAGE,
    write_images: bool = True,
    shard_writers: ShardWriters | None = None,
) -> ray.data.Dataset:
    """The lazy Ray dataset of the whole stylization job (nothing runs until it is consumed).

    ``rows`` are prepared manifest rows (``prepare_manifest``, Arrow), or a plan's pending rows read as the
    dataset runs (``PendingRows``). Stages with models (faces, stylize, score) run
    as actor pools, so models load once per actor; stateless steps (load, write) as tasks. A CPU-only config runs
    the three model stages in one pool (``fuse_cpu_stages``), and by default load and write inside it too
    (``fuse_io``), which makes the whole job one operator. Rows enter in small blocks (an actor takes a whole
    block), so every actor has work as soon as the first rows are in and until the last.

    The write stage hands the metrics and face rows to ``shard_writers`` (``pipelines.shard_writers``), and the
    dataset holds their statuses; without writers it holds the rows themselves.

    ``stylid score`` builds the same chain without the stylize stage (``stylize=False``), loading the output and
    reference images too (``images``) and writing only the shards (``write_images=False``). ``config`` is then a
    ``ScoreJobConfig``: anything with ``faces``, ``score``, ``io``, ``resources`` and ``config_hash()``.
    """
    io, res = config.io, config.resources
    resources = ray.cluster_resources()
    cpus, gpus, memory = resources.get("CPU", 1.0), resources.get("GPU", 0.0), resources.get("memory")
    _check_fits(config, cpus, gpus, stylize, memory)
    remote = stage_remote_args()
    credentials = StageCredentials.from_environ()
    key_suffix = "" if not write_images or config.is_default() else f"-{config.config_hash()}"
    # fuse_io: the fused actors load and write too, so the job is one operator: no pixels through the object store,
    # no per-task dispatch of load and write (measured on 2 cores: about 2% more images/s than separate tasks);
    # and rows not read yet are read by the actors themselves: not even the rows cross the object store
    io_inside = fused_io(config)
    reads_own_rows = io_inside and fused(config) and isinstance(rows, PendingRows)
    ds = rows.pieces_dataset() if reads_own_rows else input_dataset(rows, first_batch_rows(config), cpus)
    write_args = {"output_uri": output_uri, "config_hash": config.config_hash(), "key_suffix": key_suffix,
                  "write_images": write_images, "shard_writers": shard_writers}  # fmt: skip
    if not io_inside:
        ds = ds.map_batches(
            _load,
            fn_kwargs={"io": io, "images": images, "credentials": credentials},
            batch_format="pandas",
            batch_size=res.load.batch_size,
            num_cpus=res.load.num_cpus,
            concurrency=res.load.pool_size or None,
            **res.load.ray_memory(),
            **remote,
        )
    if fused(config):
        ds = ds.map_batches(
            with_credentials(FusedCPUStage, credentials),
            fn_constructor_kwargs={"faces": config.faces, "stylize": config.stylize if stylize else None,
                                   "score": config.score, "io": io, "write": write_args if io_inside else None,
                                   "images": images, "read_piece": rows.reader.read_piece if reads_own_rows else None,
                                   "batch_rows": res.fused.batch_size},
            # reading its own rows, an actor is given a piece at a time (a block of about input_block_rows rows)
            batch_format="pandas", batch_size=1 if reads_own_rows else res.fused.batch_size,
            num_cpus=res.fused.num_cpus,
            # one pool holds the whole CPU budget: start every actor at once (Ray's autoscaler adds actors only
            # once work queues up, which a steady stream of small blocks rarely shows)
            compute=ActorPoolStrategy(size=fused_pool_size(config, cpus, memory)),
            **res.fused.ray_memory(), **remote,
        )  # fmt: skip
        if io_inside:
            return ds
    else:
        ds = ds.map_batches(
            with_credentials(FaceStage, credentials), fn_constructor_kwargs={"faces": config.faces},
            batch_format="pandas",
            batch_size=res.faces.batch_size, num_cpus=res.faces.num_cpus, compute=_pool(res.faces, cpus, gpus),
            **res.faces.ray_memory(), **remote,
        )  # fmt: skip
        if stylize:
            ds = ds.map_batches(
                with_credentials(StylizeStage, credentials),
                fn_constructor_kwargs={"stylize": config.stylize, "score": config.score, "io": io},
                batch_format="pandas",
                batch_size=res.stylize.batch_size,
                num_cpus=res.stylize.num_cpus,
                num_gpus=res.stylize.num_gpus or None,
                compute=_pool(res.stylize, cpus, gpus),
                **res.stylize.ray_memory(),
                **remote,
            )
        ds = ds.map_batches(
            with_credentials(ScoreStage, credentials),
            fn_constructor_kwargs={"faces": config.faces, "score": config.score, "io": io},
            batch_format="pandas",
            batch_size=res.score.batch_size,
            num_cpus=res.score.num_cpus,
            num_gpus=res.score.num_gpus or None,
            compute=_pool(res.score, cpus, gpus),
            **res.score.ray_memory(),
            **remote,
        )
    ds = ds.map_batches(
        _write,
        fn_kwargs={**write_args, "io": io, "credentials": credentials},
        batch_format="pandas", batch_size=res.write.batch_size, num_cpus=res.write.num_cpus,
        concurrency=res.write.pool_size or None, **res.write.ray_memory(), **remote,
    )  # fmt: skip
    return ds


@dataclass
class RunResult:
    """What one ``run_stylize`` call did."""

    total_rows: int
    already_done: int
    processed: int
    seconds: float
    status_counts: dict[str, int] = field(default_factory=dict)  # of the rows processed by this call

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_second": self.images_per_second}


def done_ids(output_uri: str, storage_options: dict, ids=None) -> pa.ChunkedArray:
    """The ids in the output's resume ledger (``stylid_core.ledger.done_ids``), or those among ``ids``."""
    done = ledger.done_ids(output_uri, storage_options)
    if ids is None:
        return done
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    return pa.chunked_array([ids.filter(ledger.subtract_done(ids, done))], pa.string())


drop_orphan_face_shards = ledger.drop_orphan_face_shards


def _as_tables(manifest: pa.Table | pd.DataFrame | Iterable[pa.Table]) -> Iterable[pa.Table]:
    if isinstance(manifest, pd.DataFrame):
        return [pa.Table.from_pandas(manifest.reset_index(drop=True), preserve_index=False)]
    return [manifest] if isinstance(manifest, pa.Table) else manifest


def plan_pending(
    manifest: pa.Table | pd.DataFrame | Iterable[pa.Table],
    output_uri: str,
    storage_options: dict,
    block_rows: Callable[[int], int] | None = None,
) -> tuple[pa.ChunkedArray, pa.Table | PendingRows]:
    """(the manifest's ids already in ``output_uri``'s ledger, the manifest's rows not yet there).

    The ledger's ids are read concurrently and projected (``stylid_core.ledger.done_ids``). ``manifest`` is a
    ``ManifestReader`` (``iter_manifest``): one pass over its ids, each batch's looked up in the ledger's
    (``ledger.IdSet``, built once), and a second pass keeping only the pending rows, so the plan holds 9 bytes a
    manifest row and the pending rows, never the whole manifest; with ``block_rows`` (pending rows -> rows a block)
    not even the pending rows: ``PendingRows``, the row groups that hold any and their done flags, read by the
    dataset's own read tasks as it runs. Or prepared rows in memory: a table, a frame, or an iterable of tables,
    each subtracted as it comes (for small manifests)."""
    done_ledger = ledger.done_ids(output_uri, storage_options)
    if isinstance(manifest, ManifestReader):
        scan = manifest.scan_ids(ledger.IdSet(done_ledger))
        del done_ledger
        if block_rows is not None:
            return scan.done, PendingRows(manifest, scan.is_done, block_rows(scan.pending))
        # the second pass keeps only the pending rows
        pending_parts = list(keep_pending(manifest, scan.is_done, manifest.manifest_uri))
        empty = pa.table({"image_id": pa.array([], pa.string())})
        # permissive: a prepared column all null in one batch (null type) is typed by the others
        pending = pa.concat_tables(pending_parts, promote_options="permissive") if pending_parts else empty
        return scan.done, pending
    done_set = ledger.IdSet(done_ledger)
    done_parts: list[pa.ChunkedArray] = []
    pending_parts = []
    for table in _as_tables(manifest):
        ids = table.column("image_id").cast(pa.string())
        is_done = ledger.subtract_done(ids, done_set)
        done_parts.append(ids.filter(is_done))
        pending_parts.append(table.filter(pc.invert(is_done)))
    done = pa.chunked_array([c for part in done_parts for c in part.chunks], pa.string())
    pending = pa.concat_tables(pending_parts) if pending_parts else pa.table({"image_id": pa.array([], pa.string())})
    return done, pending


def process_pending(
    manifest: pa.Table | pd.DataFrame | Iterable[pa.Table],
    output_uri: str,
    storage_options: dict,
    build: Callable[[pa.Table | PendingRows, ShardWriters], ray.data.Dataset],
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    block_rows: Callable[[int], int] | None = None,
) -> tuple[pa.ChunkedArray, Counter[str]]:
    """Run the rows of ``manifest`` not yet in ``output_uri``'s ledger (``plan_pending``) through
    ``build(rows, writers)``'s dataset, its rows written into shards of ``rows_per_shard`` rows by the job's shard
    writers; returns the manifest's ids already done and the status counts of the rows processed now. Rows that
    failed in an earlier run with a transient status (``ledger.RETRIED_STATUSES``: read_error, write_error) are
    taken out of the ledger first (``ledger.release_retried_rows``), so they are pending again. All of it under
    the output's writer lease (``stylid_core.lease``): a second job into the same output is refused.

    ``build`` gets the pending rows as one Arrow table, or with ``block_rows`` as ``PendingRows`` to be read as the
    dataset runs (``plan_pending``), and the job's ``ShardWriters``: its write stage hands them its metrics and
    face rows and returns their statuses, which is all that reaches this driver. The writers are flushed when the
    stream ends or fails (the rows they hold are complete: their images are stored), then ended. With nothing
    pending no dataset is built, so no stage starts, no writer and no model loads."""
    with OutputLease(output_uri, storage_options):  # one writer per output: a second run stops here, in one line
        return _process_pending(manifest, output_uri, storage_options, build, rows_per_shard, block_rows)


def _process_pending(
    manifest: pa.Table | pd.DataFrame | Iterable[pa.Table],
    output_uri: str,
    storage_options: dict,
    build: Callable[[pa.Table | PendingRows, ShardWriters], ray.data.Dataset],
    rows_per_shard: int,
    block_rows: Callable[[int], int] | None,
) -> tuple[pa.ChunkedArray, Counter[str]]:
    retried = ledger.release_retried_rows(output_uri, storage_options)  # a storage outage's rows are redone
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


def run_stylize(config: JobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Stylize and score every manifest row not yet in ``output_uri``; Ray must be initialised."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = iter_manifest(manifest_uri, config.stylize.style_uri, opts)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    done, counts = process_pending(
        manifest, output_uri, opts,
        lambda rows, writers: build_dataset(config, rows, output_uri, shard_writers=writers), config.io.rows_per_shard,
        block_rows=lambda n: input_block_rows(n, first_batch_rows(config), cpus),
    )  # fmt: skip
    return RunResult(
        total_rows=len(done) + sum(counts.values()),
        already_done=len(done),
        processed=sum(counts.values()),
        seconds=time.perf_counter() - t0,
        status_counts=dict(counts),
    )

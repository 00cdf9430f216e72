"""Manifest reading, the one rule of every job: a Parquet manifest (a file or a prefix of many) read on the driver in
bounded Arrow batches, projected to the job's columns, each batch prepared, its ids checked unique by their 64-bit
hashes and looked up in the output's resume ledger (``ManifestReader.scan_ids``). The plan
(``pipelines.plan``) and its read tasks read the files again with ``read_manifest_file``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipelines.stages import prepare_manifest
from stylid_core import ledger
from stylid_core.storage import DEFAULT_RETRY, arrow_filesystem, is_transient, with_retries

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

    def present_ids(self, ids: pa.Array) -> pa.ChunkedArray:
        """Those of ``ids`` the manifest holds, from one pass over its ids (``ledger.IdSet`` of ``ids``, probed batch
        by batch): a rerun releases a transient error row for redoing only while its id is still here
        (``ledger.release_retried_rows``)."""
        wanted = ledger.IdSet(ids)
        found = []
        for batch in self._ids():
            mask = wanted.contains(batch)
            if mask.any():
                found.append(batch.filter(pa.array(mask)))
        return pa.chunked_array(found, pa.string())

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


def check_unique_ids(ids: pa.Array | pa.ChunkedArray, manifest_uri: str, hint: str) -> None:
    """``ValueError`` naming a few duplicates when ``ids`` (``image_id``s) are not unique; an Arrow hash count, no
    Python set."""
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

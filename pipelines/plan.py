"""The plan and its Ray source: a manifest's rows less those already in the output's resume ledger
(``plan_pending``), kept as the row groups that hold any pending row and their done flags (``PendingRows``), read
as the dataset runs by Ray's read tasks or, a piece at a time, by the fused actors themselves
(``ManifestSliceReader``). The driver holds 9 bytes a manifest row, never the rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipelines.credentials import StageCredentials, stage_runtime_env
from pipelines.manifest import ManifestReader, encode_styles, read_manifest_file
from stylid_core import ledger

#: the most input blocks a job's rows are cut into (below 4 a CPU): the driver's memory per block is per run
MAX_INPUT_BLOCKS = 500


def input_block_rows(num_rows: int, first_batch: int, cpus: float) -> int:
    """Rows of each of a job's input blocks (``PendingRows``' blocks and pieces, the training pairs' blocks).

    An actor takes a whole block: blocks as small as the first stage's batches (``first_batch``) keep every actor
    busy to the end, and a job of fewer rows than the actors' batches hold is split so that each CPU still gets some;
    but no more than ``MAX_INPUT_BLOCKS`` (4 a CPU on big clusters): each block costs the driver about 40 kB for the
    whole run (measured: 157 blocks +35 MB, 1,563 blocks +94 MB), so 64-row blocks made its RSS grow with the rows;
    500 blocks of a million rows are 2,000 rows each, a few seconds of an actor."""
    per_cpu = -(-num_rows // max(1, int(cpus)))
    max_blocks = max(MAX_INPUT_BLOCKS, 4 * int(cpus))
    return max(min(first_batch, per_cpu), -(-num_rows // max_blocks), 1)


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


def plan_pending(
    manifest: ManifestReader, output_uri: str, storage_options: dict, block_rows: Callable[[int], int]
) -> tuple[pa.ChunkedArray, PendingRows]:
    """(the manifest's ids already in ``output_uri``'s ledger, the manifest's rows not yet there, not read yet).

    The ledger's ids are read concurrently and projected (``stylid_core.ledger.done_ids``); one pass over the
    manifest's ids (``ManifestReader.scan_ids``), each batch's looked up in the ledger's (``ledger.IdSet``, built
    once), so the plan holds 9 bytes a manifest row, never the rows: ``PendingRows``, the row groups that hold any
    pending row and their done flags, cut into blocks of ``block_rows(pending rows)`` rows, read by the dataset's
    own read tasks as it runs."""
    done_ledger = ledger.done_ids(output_uri, storage_options)
    scan = manifest.scan_ids(ledger.IdSet(done_ledger))
    del done_ledger
    return scan.done, PendingRows(manifest, scan.is_done, block_rows(scan.pending))

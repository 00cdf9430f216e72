"""``stylid score`` on Ray Data: images that already exist -> load -> faces -> score -> shards, no generation.

The same chain as ``stylid run`` (``pipelines.stylize.stylize_chain`` without its stylize stage): the load stage
reads the source, the output to score and, where given, the identity reference; faces are found in the reference
or else the source; the score stage scores each face in the output as ``stylid run`` scores it, with the same
columns; the write stage writes only the ``faces/`` and ``metrics/`` shards, the metrics last (the resume ledger).

Input, either:

- a Parquet manifest of pairs: ``source_uri`` (the original photo) and ``output_uri`` (the stylized or generated
  image), optionally ``image_id`` (else a hash of both URIs), ``style_uri`` and ``reference_uri`` (the identity
  reference of a customization output, which is then scored by re-detection); or
- an output folder of ``stylid run`` (or ``stylid score``, or ``stylid customize``): its metrics name the sources and
  outputs. URIs under the folder's recorded output prefix are read under the folder given, so a copied or moved
  output is scored where it is now. Rows that failed there keep their status and error (they have no output).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.chain import build_chain, fusion_of
from pipelines.manifest import MANIFEST_BATCH_ROWS, ManifestReader
from pipelines.plan import input_block_rows
from pipelines.resources import first_batch_rows
from pipelines.runner import RunResult, process_pending
from pipelines.schema import derive_image_id
from pipelines.stages import ImageColumn, prepare_manifest, string_column
from pipelines.stylize import stylize_chain
from stylid_core import ledger
from stylid_core.config import ScoreJobConfig
from stylid_core.storage import exists, join, read_bytes

#: the images of a score row: the source, the output to score, and the identity reference where given
SCORE_IMAGES: tuple[ImageColumn, ...] = (
    ImageColumn("image_uri", "pixels"),
    ImageColumn("output_uri", "out_pixels"),
    ImageColumn("reference_uri", "ref_pixels", required=False),
)
#: the pairs manifest's columns read on the driver (whichever it has; ``source_uri`` and ``output_uri`` required)
MANIFEST_COLUMNS = ("image_id", "source_uri", "output_uri", "style_uri", "reference_uri")
#: columns a score row carries besides those of ``prepare_manifest``
CARRIED = ("output_uri", "reference_uri", "engine", "model")
#: what ``engine`` says for outputs made outside stylid (a manifest of pairs)
EXTERNAL_ENGINE = "external"
#: how a pair without an id gets one (named in the duplicate-ids error)
PAIR_ID_HINT = "rows without one get a hash of source_uri and output_uri"
#: a ``stylid run`` (or ``score``) output's metrics columns read to make its score pairs
RUN_OUTPUT_COLUMNS = ("image_id", "image_uri", "output_uri", "style_uri", "reference_uri", "engine", "model",
                      "status", "error")  # fmt: skip
#: a ``stylid customize`` output's metrics columns read to make its score pairs (one per generated image)
CUSTOMIZE_OUTPUT_COLUMNS = ("image_id", "reference_uri", "output_uris", "status", "error", "backend", "model")


def is_stylid_output(uri: str, storage_options: dict | None = None) -> bool:
    """Whether ``uri`` is an output folder of a stylid job (it has ``run.json``)."""
    try:
        return exists(join(uri, "run.json"), storage_options)
    except Exception:
        return False


def _rebase(uris: pa.Array, recorded: str | None, folder: str) -> pa.Array:
    """``uris`` moved from the output prefix they were written under (``recorded``) to where the output is now."""
    if not recorded:
        return uris
    prefix = recorded.rstrip("/") + "/"
    here = join(folder, "")
    moved = pc.fill_null(pc.starts_with(uris, prefix), False)
    # the prefix is the start of every moved URI: its first occurrence is the one replaced
    return pc.if_else(moved, pc.replace_substring(uris, pattern=prefix, replacement=here, max_replacements=1), uris)


def score_rows(
    pairs: pa.Table, default_style_uri: str | None, engine: str | None = None, recorded: bool = False
) -> pa.Table:
    """Score pairs (``image_id``, ``source_uri``, ``output_uri``, optional ``style_uri``, ``reference_uri``,
    ``engine``, ``model``) as prepared score rows: ``prepare_manifest``'s columns (the source as ``image_uri``) plus
    ``CARRIED``. An id that is not a non-blank string is derived from both URIs (``PAIR_ID_HINT``); ``engine``, when
    given, is every row's. With ``recorded``, the pairs' ``status`` and ``error`` are what the row got where it was
    made: a row that failed there keeps its status, and its error says it was not scored (it has no output)."""
    n = pairs.num_rows
    sources, outputs = string_column(pairs, "source_uri"), string_column(pairs, "output_uri")
    id_type = pairs.schema.field("image_id").type if "image_id" in pairs.column_names else pa.null()
    id_type = id_type.value_type if pa.types.is_dictionary(id_type) else id_type
    # ids that are not strings (numbers, say) are not used, as before: the row's id is derived from its URIs
    text = pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_string_view(id_type)
    ids = string_column(pairs, "image_id") if text else pa.nulls(n, pa.string())
    derive = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ids), ""), True)
    if pc.any(derive).as_py():  # Python only for the ids to derive (str(None) for a missing URI, as before)
        derived = [derive_image_id(f"{s}|{o}") for s, o in zip(sources.filter(derive).to_pylist(),
                                                               outputs.filter(derive).to_pylist())]  # fmt: skip
        ids = pc.replace_with_mask(ids, derive, pa.array(derived, pa.string()))
    styles = string_column(pairs, "style_uri")
    table = prepare_manifest(pa.table({"image_id": ids, "image_uri": sources, "style_uri": styles}), default_style_uri)
    if recorded and "status" in pairs.column_names:
        was = string_column(pairs, "status")
        failed = pc.fill_null(pc.not_equal(was, "ok"), False)
        why = string_column(pairs, "error")
        not_scored = pc.if_else(
            pc.is_null(why), pa.scalar("not scored"), pc.binary_join_element_wise("not scored: ", why, "")
        )
        table = table.set_column(3, "status", pc.if_else(failed, was, table.column("status")))
        table = table.set_column(4, "error", pc.if_else(failed, not_scored, table.column("error")))
    engines = pa.array([engine] * n, pa.string()) if engine is not None else string_column(pairs, "engine")
    for name, values in (("output_uri", outputs), ("reference_uri", string_column(pairs, "reference_uri")),
                         ("engine", engines), ("model", string_column(pairs, "model"))):  # fmt: skip
        table = table.append_column(name, values)
    return table


def _customize_pairs(metrics: pa.Table) -> pa.Table:
    """A ``stylid customize`` output's metrics rows as score pairs: one a generated image (``<id>-<k>``, the
    reference as source and identity reference), one with no output for a row that generated nothing (its status
    and error kept: ``no generated image`` where it recorded none)."""
    status = string_column(metrics, "status")
    ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
    listed = [json.loads(u) if isinstance(u, str) else [] for u in string_column(metrics, "output_uris").to_pylist()]
    generated = np.array([len(u) for u in listed], np.int64) * ok
    counts = np.maximum(generated, 1)  # a row without generated images is one pair with no output
    parent = np.repeat(np.arange(metrics.num_rows), counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    is_generated = np.repeat(generated > 0, counts)
    uris = pa.array([u for urls, g in zip(listed, generated) for u in (urls if g else [None])], pa.string())
    take = pa.array(parent)
    ids = string_column(metrics, "image_id").take(take)
    ids = pc.if_else(pa.array(is_generated), pc.binary_join_element_wise(ids, pa.array(k).cast(pa.string()), "-"), ids)
    references = string_column(metrics, "reference_uri").take(take)
    error = pc.fill_null(pc.if_else(pc.equal(string_column(metrics, "error"), ""), pa.scalar(None, pa.string()),
                                    string_column(metrics, "error")), "no generated image")  # fmt: skip
    return pa.table({
        "image_id": ids, "source_uri": references, "output_uri": uris, "reference_uri": references,
        "engine": string_column(metrics, "backend").take(take), "model": string_column(metrics, "model").take(take),
        "status": pc.if_else(pa.array(is_generated), pa.scalar("ok"), status.take(take)),
        "error": pc.if_else(pa.array(is_generated), pa.scalar(None, pa.string()), error.take(take)),
    })  # fmt: skip


def iter_output_pairs(
    folder: str,
    default_style_uri: str | None,
    storage_options: dict | None = None,
    batch_rows: int = MANIFEST_BATCH_ROWS,
) -> ManifestReader:
    """A stylid output folder's rows as prepared score rows (``score_rows`` with the status each recorded),
    streamed from its live metrics shards (``stylid_core.ledger.live_shards``) in batches of ``batch_rows``; a
    ``stylid customize`` output gives one row per generated image (``<image_id>-<k>``). URIs under the folder's
    recorded output prefix are read under ``folder``. ``ValueError`` for a folder with no metrics shards or whose
    metrics name no source and output."""
    info = json.loads(read_bytes(join(folder, "run.json"), storage_options))
    shards = ledger.live_shards(folder, storage_options)
    if not shards:
        raise ValueError(f"{folder} has a run.json but no metrics shards: nothing to score")
    recorded = info.get("output")
    customize = info.get("job", "run") == "customize"

    def prepare(metrics: pa.Table) -> pa.Table:
        if customize:
            pairs = _customize_pairs(metrics)
        else:
            pairs = metrics.rename_columns(["source_uri" if c == "image_uri" else c for c in metrics.column_names])
        for name in ("source_uri", "output_uri", "reference_uri"):
            if name in pairs.column_names:
                k = pairs.column_names.index(name)
                pairs = pairs.set_column(k, name, _rebase(string_column(pairs, name), recorded, folder))
        return score_rows(pairs, default_style_uri, recorded=True)

    # the id columns: what a row's ids (and, for a customization, how many rows it makes) depend on
    if customize:
        required, columns, ids = "reference_uri", CUSTOMIZE_OUTPUT_COLUMNS, ("image_id", "output_uris", "status")
    else:
        required, columns, ids = "image_uri", RUN_OUTPUT_COLUMNS, ("image_id", "image_uri", "output_uri")
    reader = ManifestReader(
        join(folder, ledger.METRICS), default_style_uri, storage_options, batch_rows, required=required,
        columns=columns, id_columns=ids, prepare=prepare, id_hint=PAIR_ID_HINT, files=shards,
    )  # fmt: skip
    if not customize and "output_uri" not in reader.dataset.schema.names:
        raise ValueError(f"{folder}: its metrics name no image_uri/output_uri; is it a stylid run output?")
    return reader


def iter_score_manifest(
    manifest_uri: str,
    default_style_uri: str | None,
    storage_options: dict | None = None,
    batch_rows: int = MANIFEST_BATCH_ROWS,
) -> ManifestReader:
    """``stylid score``'s input streamed as ``stylid run``'s manifest is (``ManifestReader``: pyarrow batches of
    ``batch_rows``, projected, each batch prepared by ``score_rows``), for ``process_pending``: a Parquet manifest of
    pairs (file or prefix), or a stylid output folder (``iter_output_pairs``). ``ValueError`` at construction for a
    missing manifest or missing columns, for duplicate ids when the plan reads the ids."""
    if is_stylid_output(manifest_uri, storage_options):
        return iter_output_pairs(manifest_uri, default_style_uri, storage_options, batch_rows)
    reader = ManifestReader(
        manifest_uri, default_style_uri, storage_options, batch_rows, required="source_uri", columns=MANIFEST_COLUMNS,
        id_columns=("image_id", "source_uri", "output_uri"),
        prepare=lambda pairs: score_rows(pairs, default_style_uri, engine=EXTERNAL_ENGINE), id_hint=PAIR_ID_HINT,
    )  # fmt: skip
    names = reader.dataset.schema.names
    if "output_uri" not in names:
        raise ValueError(f"manifest {manifest_uri} has no 'output_uri' column (columns: {sorted(names)});"
                         " a score manifest pairs source_uri with output_uri")  # fmt: skip
    return reader


def run_score(config: ScoreJobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Score every row not yet in ``output_uri``'s ledger; Ray must be initialised. A finished output does no
    model work. The input streams (``iter_score_manifest``): the plan keeps the pending rows' row groups and done
    flags (``PendingRows``), read as the dataset runs, so the driver holds the ids' hashes, never the manifest."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = iter_score_manifest(manifest_uri, config.style_uri, opts)
    cpus = ray.cluster_resources().get("CPU", 1.0)

    def build(rows, writers):
        specs = stylize_chain(config, output_uri, stylize=False, images=SCORE_IMAGES, write_images=False,
                              shard_writers=writers)  # fmt: skip
        return build_chain(rows, specs, fusion_of(config.resources))

    done, counts = process_pending(
        manifest, output_uri, opts, build, config.io.rows_per_shard,
        block_rows=lambda n: input_block_rows(n, first_batch_rows(config), cpus),
    )  # fmt: skip
    return RunResult.of(done, counts, time.perf_counter() - t0)

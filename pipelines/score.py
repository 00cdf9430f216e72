"""``stylid score`` on Ray Data: images that already exist -> load -> faces -> score -> shards, no generation.

The same chain as ``stylid run`` (``pipelines.stylize.build_dataset`` without its stylize stage): the load stage
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

import pandas as pd

from pipelines.schema import derive_image_id
from pipelines.stages import ImageColumn, prepare_rows
from pipelines.stylize import RunResult, build_dataset, check_unique_ids, process_pending, read_manifest_columns
from stylid_core import ledger
from stylid_core.config import ScoreJobConfig
from stylid_core.storage import exists, join, read_bytes

#: the images of a score row: the source, the output to score, and the identity reference where given
SCORE_IMAGES: tuple[ImageColumn, ...] = (
    ImageColumn("image_uri", "pixels"),
    ImageColumn("output_uri", "out_pixels"),
    ImageColumn("reference_uri", "ref_pixels", required=False),
)
#: the optional manifest columns read on the driver besides ``source_uri``
MANIFEST_COLUMNS = ("image_id", "output_uri", "style_uri", "reference_uri")
#: columns a score row carries besides those of ``prepare_rows``
CARRIED = ("output_uri", "reference_uri", "engine", "model")
#: what ``engine`` says for outputs made outside stylid (a manifest of pairs)
EXTERNAL_ENGINE = "external"


def is_stylid_output(uri: str, storage_options: dict | None = None) -> bool:
    """Whether ``uri`` is an output folder of a stylid job (it has ``run.json``)."""
    try:
        return exists(join(uri, "run.json"), storage_options)
    except Exception:
        return False


def _rebase(uri, recorded: str | None, folder: str):
    """``uri`` moved from the output prefix it was written under (``recorded``) to where the output is now."""
    if not (isinstance(uri, str) and recorded):
        return uri
    prefix = recorded.rstrip("/") + "/"
    if uri.startswith(prefix):
        return join(folder, *uri[len(prefix) :].split("/"))
    return uri


def pairs_of_output(folder: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The rows of a stylid output folder as score pairs: ``image_id``, ``source_uri``, ``output_uri``,
    ``style_uri``, ``reference_uri``, ``engine``, ``model`` and the ``status``/``error`` it recorded."""
    info = json.loads(read_bytes(join(folder, "run.json"), storage_options))
    metrics = ledger.read_frame(folder, ledger.METRICS, storage_options)
    if metrics.empty:
        raise ValueError(f"{folder} has a run.json but no metrics shards: nothing to score")
    recorded = info.get("output")
    job = info.get("job", "run")
    if job == "customize":
        rows = []
        for _, r in metrics.iterrows():
            outputs = json.loads(r["output_uris"]) if isinstance(r.get("output_uris"), str) else []
            base = {"source_uri": r["reference_uri"], "reference_uri": r["reference_uri"], "style_uri": None,
                    "engine": r.get("backend"), "model": r.get("model")}  # fmt: skip
            if r["status"] != "ok" or not outputs:
                rows.append({**base, "image_id": str(r["image_id"]), "output_uri": None, "status": r["status"],
                             "error": r.get("error") or "no generated image"})  # fmt: skip
            for k, uri in enumerate(outputs if r["status"] == "ok" else []):
                rows.append({**base, "image_id": f"{r['image_id']}-{k}", "output_uri": uri, "status": "ok",
                             "error": None})  # fmt: skip
        pairs = pd.DataFrame(rows)
    else:
        if "image_uri" not in metrics or "output_uri" not in metrics:
            raise ValueError(f"{folder}: its metrics name no image_uri/output_uri; is it a stylid run output?")
        pairs = metrics.rename(columns={"image_uri": "source_uri"})
        for col in ("style_uri", "reference_uri", "engine", "model", "error"):
            if col not in pairs:
                pairs[col] = None
    for col in ("source_uri", "output_uri", "reference_uri"):
        pairs[col] = [_rebase(u, recorded, folder) for u in pairs[col]]
    cols = ["image_id", "source_uri", "output_uri", "style_uri", "reference_uri", "engine", "model", "status", "error"]
    return pairs[cols].reset_index(drop=True)


def read_score_manifest(
    manifest_uri: str, default_style_uri: str | None, storage_options: dict | None = None
) -> pd.DataFrame:
    """Prepared score rows (``prepare_rows`` plus ``output_uri``, ``reference_uri``, ``engine``, ``model``), from a
    Parquet manifest of pairs or a stylid output folder. ``ValueError`` for a missing manifest, missing columns or
    duplicate ids."""
    from_output = is_stylid_output(manifest_uri, storage_options)
    if from_output:
        raw = pairs_of_output(manifest_uri, storage_options)
    else:
        raw = read_manifest_columns(manifest_uri, "source_uri", MANIFEST_COLUMNS, storage_options)
        if "output_uri" not in raw:
            raise ValueError(f"manifest {manifest_uri} has no 'output_uri' column (columns: {sorted(raw.columns)});"
                             " a score manifest pairs source_uri with output_uri")  # fmt: skip
    raw = raw.rename(columns={"source_uri": "image_uri"}).reset_index(drop=True)
    for col in ("image_id", *CARRIED):
        if col not in raw:
            raw[col] = None
    raw["image_id"] = [
        str(i) if isinstance(i, str) and i.strip() else derive_image_id(f"{s}|{o}")
        for i, s, o in zip(raw["image_id"], raw["image_uri"], raw["output_uri"])
    ]
    df = prepare_rows(raw, default_style_uri, keep=CARRIED)
    if from_output:  # rows that failed where they were made keep their status: they have no output to score
        failed = (raw["status"] != "ok").to_numpy()
        df.loc[failed, "status"] = raw.loc[failed, "status"].to_numpy()
        df.loc[failed, "error"] = [f"not scored: {e}" if isinstance(e, str) else "not scored"
                                   for e in raw.loc[failed, "error"]]  # fmt: skip
    else:
        df["engine"], df["model"] = EXTERNAL_ENGINE, None
    check_unique_ids(df, manifest_uri, "rows without one get a hash of source_uri and output_uri")
    return df


def run_score(config: ScoreJobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Score every row not yet in ``output_uri``'s ledger; Ray must be initialised. A finished output does no
    model work."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = read_score_manifest(manifest_uri, config.style_uri, opts)

    def build(rows: pd.DataFrame):
        return build_dataset(config, rows, output_uri, stylize=False, images=SCORE_IMAGES, write_images=False)

    done, counts = process_pending(manifest, output_uri, opts, build)
    return RunResult(
        total_rows=len(manifest),
        already_done=len(done),
        processed=sum(counts.values()),
        seconds=time.perf_counter() - t0,
        status_counts=dict(counts),
    )

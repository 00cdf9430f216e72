"""``stylid canary``: pick a canary manifest from a scored dataset (a ``stylid run`` or ``stylid score`` output) so
that every size bucket of the gate has at least ``gate.min_faces`` faces (``stylid_core.canary``).

Exit codes: 0 every bucket reached min_faces; 3 the manifest is written but some bucket could not reach it (named);
2 bad input (no such output, an unfinished one, no faces, an output of another job; ``jobs.cli`` maps
``ValueError`` to 2).
"""

from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import add_config_arguments, load_score_config
from jobs.output import read_finished_run
from stylid_core import ledger
from stylid_core.canary import BUCKETS, format_pick, pick_canary
from stylid_core.storage import write_bytes

EXIT_SHORT = 3
#: the manifest columns ``stylid run`` reads, and those ``stylid score`` reads for a score output's pairs
RUN_COLUMNS = ("image_id", "image_uri", "style_uri")
SCORE_COLUMNS = ("image_id", "source_uri", "output_uri", "style_uri", "reference_uri")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("canary", help="pick a canary manifest with gate.min_faces faces in every size bucket")
    p.add_argument("--dataset", required=True, help="a finished stylid run or stylid score output (faces/, metrics/)")
    p.add_argument("--output", required=True, help="the Parquet manifest to write (file path or URI)")
    p.add_argument("--min-faces", type=int, help="faces each size bucket needs (default: gate.min_faces of --config)")
    add_config_arguments(p, default="nightly_score", what=" (the score config whose gate.min_faces is the default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tie-breaking order (default 0)")
    p.add_argument("--max-images", type=int, help="pick at most this many images")
    p.add_argument("--buckets", help="comma-separated size buckets to fill (default: all of them: "
                   + ", ".join(BUCKETS) + "); the others are taken as they come")  # fmt: skip
    p.set_defaults(func=main)


def read_dataset(uri: str, storage_options: dict) -> tuple[str, pa.Table, object]:
    """The output's job (``run`` or ``score``), its ok rows' manifest columns and its faces frame, each read
    projected to the columns the pick and the manifest need."""
    info = read_finished_run(uri, storage_options, "dataset", kind="stylid run or score output")
    job = info.get("job", "run")
    if job not in ("run", "score"):
        raise ValueError(f"dataset {uri} is a stylid {job} output; give a stylid run or stylid score output")
    wanted = ["status", "image_uri", *SCORE_COLUMNS] if job == "score" else ["status", *RUN_COLUMNS]
    metrics = ledger.read_frame(uri, ledger.METRICS, storage_options, list(dict.fromkeys(wanted)))
    faces = ledger.read_frame(uri, ledger.FACES, storage_options, ["image_id", "face_index", "size_bucket"])
    if metrics.empty or faces.empty:
        raise ValueError(f"dataset {uri} has no {'metrics' if metrics.empty else 'faces'} shards")
    if "status" in metrics:
        metrics = metrics[metrics["status"] == "ok"]
    metrics = metrics.drop_duplicates("image_id")
    if job == "score":
        metrics = metrics.rename(columns={"image_uri": "source_uri"})
        columns = [c for c in SCORE_COLUMNS if c in metrics and (c in ("image_id", "source_uri", "output_uri")
                                                                  or metrics[c].notna().any())]  # fmt: skip
    else:
        columns = [c for c in RUN_COLUMNS if c in metrics and (c != "style_uri" or metrics[c].notna().any())]
    return job, pa.Table.from_pandas(metrics[columns], preserve_index=False), faces


def main(args: argparse.Namespace) -> int:
    config, gate = load_score_config(args.config, args.set)
    min_faces = gate.min_faces if args.min_faces is None else args.min_faces
    buckets = None if args.buckets is None else [b.strip() for b in args.buckets.split(",") if b.strip()]
    storage = config.io.storage_options  # the dataset's and the manifest's store, as stylid score reaches it
    job, rows, faces = read_dataset(args.dataset, storage)
    pick = pick_canary(faces, rows.column("image_id").to_pylist(), min_faces, args.seed, args.max_images, buckets)
    if not pick.image_ids:
        raise ValueError(f"dataset {args.dataset}: no ok image with faces to pick")
    order = {i: k for k, i in enumerate(pick.image_ids)}
    ids = rows.column("image_id").to_pylist()
    chosen = rows.take(sorted((k for k, i in enumerate(ids) if i in order), key=lambda k: order[ids[k]]))
    sink = pa.BufferOutputStream()
    pq.write_table(chosen, sink)
    write_bytes(args.output, sink.getvalue().to_pybytes(), storage)
    print(format_pick(pick))
    print(f"manifest: {args.output} ({chosen.num_rows} rows, for stylid {'score' if job == 'score' else 'run'})")
    return EXIT_SHORT if pick.short else 0

"""``stylid run``: stylize and score a manifest (or the bundled sample), write images, metrics and a report."""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import add_config_arguments, add_output_arguments, add_ray_arguments, load_config
from jobs.output import check_output_config, close_output, open_output
from jobs.ray_cluster import init_ray
from pipelines.preflight import preflight_run
from stylid_core.config import JobConfig
from stylid_core.report import format_summary, summarize_output, write_report
from stylid_core.storage import join, read_bytes, write_bytes

log = logging.getLogger(__name__)
DEFAULT_OUTPUT = "stylid-output"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="stylize and score a manifest of images (default: the bundled sample)")
    p.add_argument("--manifest", help="Parquet file or prefix (local path or fsspec URI) with an image_uri column;"
                   " omitted: the bundled sample")  # fmt: skip
    add_output_arguments(p, required=False, default=DEFAULT_OUTPUT)
    add_config_arguments(p, default="default")
    add_ray_arguments(p)
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=main)


def write_sample_manifest(output_uri: str, storage_options: dict) -> str:
    """Put the bundled sample images under ``<output>/sample_inputs/`` and return its manifest's URI."""
    from stylid_core.sample_data import write_sample_set

    base = join(output_uri, "sample_inputs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in write_sample_set(tmp):
            name = os.path.basename(row["image_uri"])
            uri = join(base, name)
            with open(row["image_uri"], "rb") as f:
                _write_if_changed(uri, f.read(), storage_options)
            rows.append({"image_id": row["image_id"], "image_uri": uri})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), buf)
    manifest = join(base, "manifest.parquet")
    _write_if_changed(manifest, buf.getvalue(), storage_options)
    return manifest


def _write_if_changed(uri: str, data: bytes, storage_options: dict) -> None:
    """``data`` to ``uri`` unless it holds them already: a run's manifest is never rewritten under it (a rewrite,
    even of the same rows, fails the reads of a run that planned from it: ``pipelines.manifest.file_version``)."""
    try:
        if read_bytes(uri, storage_options) == data:
            return
    except Exception:  # absent or unreadable: write it
        pass
    write_bytes(uri, data, storage_options)


def run_job(
    config: JobConfig,
    output_uri: str,
    manifest_uri: str | None = None,
    overwrite: bool = False,
    report: bool = True,
    preflight: bool = True,
) -> dict:
    """The whole job on an initialised Ray: returns the content of ``run.json``. With ``preflight`` the manifest,
    output and style images are checked first (``pipelines.preflight``; ``main`` does it before Ray starts)."""
    from pipelines.stylize import run_stylize

    opts = config.io.storage_options
    if preflight:
        preflight_run(config, manifest_uri, output_uri)
    out = open_output("run", config, output_uri, overwrite)
    manifest_uri = manifest_uri or write_sample_manifest(output_uri, opts)
    result = run_stylize(config, manifest_uri, output_uri)
    summary = summarize_output(output_uri, opts)  # a projected scan of the ledger, shard by shard
    info = {"manifest": manifest_uri, "is_default_config": config.is_default(), "this_run": result.to_dict(),
            "summary": summary}  # fmt: skip
    return close_output(out, info, (lambda _: write_report(output_uri, opts)) if report and summary["rows"] else None)


def main(args: argparse.Namespace) -> int:
    config = load_config("run", args.config, args.set)
    preflight_run(config, args.manifest, args.output)  # before Ray starts: a bad input fails in seconds, in one line
    check_output_config(args.output, config, args.overwrite, "run")  # the job checks again: then a no-op
    init_ray(args.address, args.num_cpus)
    info = run_job(
        config, args.output, args.manifest, overwrite=args.overwrite, report=not args.no_report, preflight=False
    )
    r = info["this_run"]
    print()
    print(f"stylid run: {r['total_rows']} rows in the manifest, {r['already_done']} already done, "
          f"{r['processed']} processed in {r['seconds']:.1f} s ({r['images_per_second']:.2f} images/s)")  # fmt: skip
    print(format_summary(info["summary"]))
    print(f"output: {args.output}" + (f"  report: {info['report']}" if "report" in info else ""))
    return 0

"""``stylid run``: stylize and score a manifest (or the bundled sample), write images, metrics and a report."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import io
import json
import logging
import os
import platform
import posixpath
import tempfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import load_job_config
from jobs.ray_cluster import init_ray
from pipelines.preflight import preflight_run
from stylid_core.config import ConfigError, JobConfig
from stylid_core.ledger import METRICS, iter_shards
from stylid_core.metrics import METRICS_VERSION
from stylid_core.report import format_summary, summarize_output, write_report
from stylid_core.secrets import redact, scrub, secret_values
from stylid_core.storage import delete, filesystem, join, read_bytes, write_bytes

log = logging.getLogger(__name__)
DEFAULT_OUTPUT = "stylid-output"
_VERSIONED = ("stylid", "ray", "torch", "diffusers", "transformers", "dlib-bin", "insightface", "onnxruntime",
              "opencv-python-headless", "pyarrow", "pandas", "numpy", "fsspec", "s3fs")  # fmt: skip


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="stylize and score a manifest of images (default: the bundled sample)")
    p.add_argument("--manifest", help="Parquet file or prefix (local path or fsspec URI) with an image_uri column;"
                   " omitted: the bundled sample")  # fmt: skip
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output folder or URI (default: ./{DEFAULT_OUTPUT})")
    p.add_argument("--config", default="default", help="config name in configs/ or a YAML path (default: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--overwrite", action="store_true", help="start over in an output written with another config")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=main)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


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
    even of the same rows, fails the reads of a run that planned from it: ``pipelines.stylize.file_version``)."""
    try:
        if read_bytes(uri, storage_options) == data:
            return
    except Exception:  # absent or unreadable: write it
        pass
    write_bytes(uri, data, storage_options)


def check_output_config(output_uri: str, config: JobConfig, overwrite: bool) -> None:
    """Refuse to mix two configs' rows in one output (the resume ledger would count the other config's rows).

    ``config`` is any job config with ``config_hash()`` and ``io.storage_options`` (``stylid customize`` uses it
    too). With ``overwrite`` the previous run is removed: the images its metrics list (``output_uri``, or the JSON
    list ``output_uris`` of ``stylid customize``), its ``metrics/`` and ``faces/`` shards, ``report.html``,
    ``run.json`` and ``_SUCCESS``. Nothing else under the output is touched (the bundled sample's inputs, files of
    the user's). The hash is read from ``run.json`` and from ``CONFIG_RECORD``, which this check writes before
    the job writes any row."""
    opts = config.io.storage_options
    this = config.config_hash()
    try:
        previous = json.loads(read_bytes(join(output_uri, "run.json"), opts))
    except Exception:
        previous = None
    started = _recorded_hash(output_uri, CONFIG_RECORD, opts)
    version = (previous or {}).get("metrics_version", 1)  # customize rows have no scores of these kinds
    same_version = previous is None or previous.get("job") == "customize" or version == METRICS_VERSION
    finished = (previous or {}).get("config_hash")
    other = next((h for h in (finished, started) if h and h != this), None)
    if other is None and same_version:
        if started != this:  # a new output, or one of a version before the record
            _record_config(output_uri, this, opts)
        return
    if not overwrite:
        what = (f"another config (hash {other}, this one is {this})" if other is not None
                else f"metrics version {version} (this stylid writes {METRICS_VERSION})")  # fmt: skip
        raise ConfigError(
            f"{output_uri} holds a run with {what}; choose another --output, or pass --overwrite to start over there"
        )
    images = previous_images(output_uri, opts)
    log.info("--overwrite: removing the previous run (%d images, its metrics and faces shards)", len(images))
    for uri in images:
        delete(uri, opts)
    for sub in ("metrics", "faces"):
        fs, path = filesystem(join(output_uri, sub), opts)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    for name in ("report.html", "_SUCCESS", "run.json"):
        delete(join(output_uri, name), opts)
    _record_config(output_uri, this, opts)


#: the config hash of the rows under an output, written before its first row (``run.json`` comes only at the end:
#: after a crash, a rerun with another config would otherwise mix two configs' rows silently)
CONFIG_RECORD = "_config.json"


def _recorded_hash(output_uri: str, name: str, storage_options: dict) -> str | None:
    try:
        return json.loads(read_bytes(join(output_uri, name), storage_options)).get("config_hash")
    except Exception:  # absent (a new output) or unreadable: nothing recorded
        return None


def _record_config(output_uri: str, config_hash: str, storage_options: dict) -> None:
    record = {"config_hash": config_hash, "recorded": dt.datetime.now(dt.timezone.utc).isoformat()}
    write_bytes(join(output_uri, CONFIG_RECORD), json.dumps(record).encode(), storage_options)


def previous_images(output_uri: str, storage_options: dict) -> list[str]:
    """The images of this output that its metrics shards record (both jobs' layouts): for each recorded URI, the
    object of the same name under ``<output_uri>/images/``, so a copied or moved output never reaches back into
    the place it was copied from, and nothing outside ``images/`` is named."""
    uris: set[str] = set()
    for table in iter_shards(output_uri, METRICS, storage_options, ["output_uri", "output_uris"]):
        if "output_uri" in table.column_names:
            uris |= {u for u in table.column("output_uri").to_pylist() if isinstance(u, str) and u}
        if "output_uris" in table.column_names:
            uris |= {u for v in table.column("output_uris").to_pylist() if isinstance(v, str) and v
                     for u in json.loads(v)}  # fmt: skip
    return sorted({join(output_uri, "images", posixpath.basename(u)) for u in uris})


def write_run_json(output_uri: str, info: dict, storage_options: dict) -> None:
    """``<output>/run.json``: ``info`` with credentials redacted (secret-named keys) and scrubbed (any known secret
    value, from the storage options or the environment, wherever it appears in the text). Every job writes its
    run.json through here."""
    text = json.dumps(redact(info), indent=2, default=str)
    write_bytes(join(output_uri, "run.json"), scrub(text, secret_values(storage_options)).encode(), storage_options)


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
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    if preflight:
        preflight_run(config, manifest_uri, output_uri)
    check_output_config(output_uri, config, overwrite)
    delete(join(output_uri, "_SUCCESS"), opts)
    manifest_uri = manifest_uri or write_sample_manifest(output_uri, opts)
    result = run_stylize(config, manifest_uri, output_uri)
    summary = summarize_output(output_uri, opts)  # a projected scan of the ledger, shard by shard
    info = {
        "job": "run",
        "metrics_version": METRICS_VERSION,
        "manifest": manifest_uri,
        "output": output_uri,
        "config": redact(config.to_dict()),
        "config_hash": config.config_hash(),
        "is_default_config": config.is_default(),
        "versions": versions(),
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "this_run": result.to_dict(),
        "summary": summary,
    }
    write_run_json(output_uri, info, opts)
    if report and summary["rows"]:
        info["report"] = write_report(output_uri, opts)
    write_bytes(join(output_uri, "_SUCCESS"), b"", opts)
    return info


def main(args: argparse.Namespace) -> int:
    config = load_job_config(args.config, args.set)
    preflight_run(config, args.manifest, args.output)  # before Ray starts: a bad input fails in seconds, in one line
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

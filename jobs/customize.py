"""``stylid customize --config configs/customize_facesnap.yaml --manifest M --output O``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections import Counter

import fsspec
import pyarrow.compute as pc
import yaml

from jobs.ray_cluster import init_ray
from jobs.run import check_output_config, versions, write_run_json
from pipelines.preflight import preflight_customize
from stylid_core.customize.job_config import CustomizeJobConfig
from stylid_core.ledger import FACES, METRICS, iter_shards, live_shards
from stylid_core.storage import delete, join, write_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``customize`` on the ``stylid`` CLI."""
    p = subparsers.add_parser("customize", help="generate identity-preserving portraits from reference photos")
    p.add_argument("--config", required=True, help="YAML with a CustomizeJobConfig (optionally under 'customize:')")
    p.add_argument("--manifest", required=True, help="Parquet: reference_uri, prompt[, pose_uri, num_images]")
    p.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    p.add_argument(
        "--address", dest="ray_address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)"
    )
    p.add_argument("--overwrite", action="store_true", help="start over in an output written with another config")
    p.set_defaults(func=run)
    return p


def load_config(path: str) -> CustomizeJobConfig:
    with fsspec.open(path, "r") as f:
        data = yaml.safe_load(f) or {}
    return CustomizeJobConfig.from_dict(data.get("customize", data))


def run_customize_job(config: CustomizeJobConfig, manifest_uri: str, output_uri: str, overwrite: bool = False) -> dict:
    """The whole job on an initialised Ray, with ``stylid run``'s guarantees: refuse an output written with another
    config (unless ``overwrite``), do only the rows not yet in ``metrics/``, then write ``run.json`` (config,
    versions, counts over the whole output) and ``_SUCCESS`` last. Returns the content of ``run.json``."""
    from pipelines.customize import run_customize

    opts = config.io.storage_options
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    check_output_config(output_uri, config, overwrite)
    delete(join(output_uri, "_SUCCESS"), opts)
    result = run_customize(config, manifest_uri, output_uri)
    names = live_shards(output_uri, opts)  # the ledger, read projected, shard by shard
    counts: Counter[str] = Counter()
    generated = detected = matched = 0
    for table in iter_shards(output_uri, METRICS, opts, ["status"], names):
        counts.update(str(s) for s in table.column("status").to_pylist())
    for table in iter_shards(output_uri, FACES, opts, ["detected", "id_match"], names):
        generated += table.num_rows
        detected += int(pc.sum(pc.fill_null(table.column("detected"), False)).as_py() or 0)
        matched += int(pc.sum(pc.fill_null(table.column("id_match"), False)).as_py() or 0)
    config_dict = config.to_dict()
    config_dict["io"].pop("storage_options", None)  # may hold credentials (write_run_json redacts them anyway)
    info = {
        "job": "customize",
        "manifest": manifest_uri,
        "output": output_uri,
        "config": config_dict,
        "config_hash": config.config_hash(),
        "versions": versions(),
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "this_run": result.to_dict(),
        "rows": sum(counts.values()),
        "counts": dict(counts),
        "generated_images": generated,
        "faces_detected": detected,
        "id_match_rate": matched / generated if generated else None,
    }
    write_run_json(output_uri, info, opts)
    write_bytes(join(output_uri, "_SUCCESS"), b"", opts)
    return info


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    preflight_customize(config, args.manifest, args.output)  # before Ray starts (see pipelines.preflight)
    init_ray(args.ray_address)
    info = run_customize_job(config, args.manifest, args.output, overwrite=args.overwrite)
    print(json.dumps({k: info[k] for k in ("this_run", "rows", "counts", "id_match_rate")}, indent=2))
    return 0

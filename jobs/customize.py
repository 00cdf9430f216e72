"""``stylid customize --config configs/customize_facesnap.yaml --manifest M --output O``."""

from __future__ import annotations

import argparse
import datetime as dt
import json

import fsspec
import yaml

from jobs.ray_cluster import init_ray
from jobs.run import check_output_config, versions
from pipelines.preflight import preflight_customize
from stylid_core.customize.job_config import CustomizeJobConfig
from stylid_core.storage import delete, join, read_parquet_dir, write_bytes


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
    metrics = read_parquet_dir(join(output_uri, "metrics"), opts, columns=["image_id", "status"])
    faces = read_parquet_dir(join(output_uri, "faces"), opts, columns=["detected", "id_match"])
    config_dict = config.to_dict()
    config_dict["io"].pop("storage_options", None)  # may hold credentials
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
        "rows": int(len(metrics)),
        "counts": {str(k): int(v) for k, v in metrics["status"].value_counts().items()} if len(metrics) else {},
        "generated_images": int(len(faces)),
        "faces_detected": int(faces["detected"].fillna(False).sum()) if len(faces) else 0,
        "id_match_rate": float(faces["id_match"].fillna(False).mean()) if len(faces) else None,
    }
    write_bytes(join(output_uri, "run.json"), json.dumps(info, indent=2, default=str).encode(), opts)
    write_bytes(join(output_uri, "_SUCCESS"), b"", opts)
    return info


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    preflight_customize(config, args.manifest, args.output)  # before Ray starts (see pipelines.preflight)
    init_ray(args.ray_address)
    info = run_customize_job(config, args.manifest, args.output, overwrite=args.overwrite)
    print(json.dumps({k: info[k] for k in ("this_run", "rows", "counts", "id_match_rate")}, indent=2))
    return 0

"""``stylid customize --config configs/customize_facesnap.yaml --manifest M --output O``."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pyarrow.compute as pc

from jobs.config import add_config_arguments, add_output_arguments, add_ray_arguments, load_config
from jobs.output import check_output_config, close_output, open_output
from jobs.ray_cluster import init_ray
from pipelines.preflight import preflight_customize
from stylid_core.customize.job_config import CustomizeJobConfig
from stylid_core.ledger import FACES, METRICS, iter_shards, live_shards


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``customize`` on the ``stylid`` CLI."""
    p = subparsers.add_parser("customize", help="generate identity-preserving portraits from reference photos")
    add_config_arguments(p, what=" with a CustomizeJobConfig (optionally under 'customize:')")
    p.add_argument("--manifest", required=True, help="Parquet: reference_uri, prompt[, pose_uri, num_images]")
    add_output_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(func=run)
    return p


def output_counts(output_uri: str, storage_options: dict) -> dict:
    """The whole output's status counts, generated images, faces detected and identity-match rate (the ledger,
    read projected, shard by shard)."""
    names = live_shards(output_uri, storage_options)
    counts: Counter[str] = Counter()
    generated = detected = matched = 0
    for table in iter_shards(output_uri, METRICS, storage_options, ["status"], names):
        counts.update(str(s) for s in table.column("status").to_pylist())
    for table in iter_shards(output_uri, FACES, storage_options, ["detected", "id_match"], names):
        generated += table.num_rows
        detected += int(pc.sum(pc.fill_null(table.column("detected"), False)).as_py() or 0)
        matched += int(pc.sum(pc.fill_null(table.column("id_match"), False)).as_py() or 0)
    return {"rows": sum(counts.values()), "counts": dict(counts), "generated_images": generated,
            "faces_detected": detected, "id_match_rate": matched / generated if generated else None}  # fmt: skip


def run_customize_job(config: CustomizeJobConfig, manifest_uri: str, output_uri: str, overwrite: bool = False) -> dict:
    """The whole job on an initialised Ray, with ``stylid run``'s lifecycle (``jobs.output``): refuse an output
    written with another config (unless ``overwrite``), do only the rows not yet in ``metrics/``, then write
    ``run.json`` (config, versions, counts over the whole output) and ``_SUCCESS`` last. Returns ``run.json``."""
    from pipelines.customize import run_customize

    out = open_output("customize", config, output_uri, overwrite)
    result = run_customize(config, manifest_uri, output_uri)
    info = {"manifest": manifest_uri, "this_run": result.to_dict(),
            **output_counts(output_uri, config.io.storage_options)}  # fmt: skip
    return close_output(out, info)


def run(args: argparse.Namespace) -> int:
    config = load_config("customize", args.config, args.set)
    preflight_customize(config, args.manifest, args.output)  # before Ray starts (see pipelines.preflight)
    check_output_config(args.output, config, args.overwrite, "customize")  # the job checks again: then a no-op
    init_ray(args.address, args.num_cpus)
    info = run_customize_job(config, args.manifest, args.output, overwrite=args.overwrite)
    print(json.dumps({k: info[k] for k in ("this_run", "rows", "counts", "id_match_rate")}, indent=2))
    return 0

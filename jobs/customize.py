"""``stylid customize --config configs/customize_facesnap.yaml --manifest M --output O``."""

from __future__ import annotations

import argparse
import json

import fsspec
import yaml

from jobs.ray_cluster import init_ray
from stylid_core.customize.job_config import CustomizeJobConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``customize`` on the ``stylid`` CLI."""
    p = subparsers.add_parser("customize", help="generate identity-preserving portraits from reference photos")
    p.add_argument("--config", required=True, help="YAML with a CustomizeJobConfig (optionally under 'customize:')")
    p.add_argument("--manifest", required=True, help="Parquet: reference_uri, prompt[, pose_uri, num_images]")
    p.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    p.add_argument(
        "--address", dest="ray_address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)"
    )
    p.set_defaults(func=run)
    return p


def load_config(path: str) -> CustomizeJobConfig:
    with fsspec.open(path, "r") as f:
        data = yaml.safe_load(f) or {}
    return CustomizeJobConfig.from_dict(data.get("customize", data))


def run(args: argparse.Namespace) -> int:
    from pipelines.customize import run_customize

    config = load_config(args.config)
    init_ray(args.ray_address)
    result = run_customize(config, args.manifest, args.output)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stylid")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

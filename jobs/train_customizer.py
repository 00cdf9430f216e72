"""``stylid train-customizer --config configs/train_facesnap.yaml``: train FaceSnap's modules on Ray Train."""

from __future__ import annotations

import argparse
import json
import logging

from jobs.config import add_config_arguments, add_ray_arguments, load_config
from jobs.output import check_writable
from jobs.ray_cluster import init_ray
from stylid_core.config import IOConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-customizer`` on the ``stylid`` CLI."""
    p = subparsers.add_parser("train-customizer", help="train the FaceSnap customizer (Ray Train)")
    add_config_arguments(p, what=" with a FaceSnapTrainConfig (optionally under 'train:')")
    p.add_argument("--manifest", help="override train.manifest")
    p.add_argument("--storage-path", help="override train.storage_path (any fsspec URI)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--num-workers", type=int, help="override train.num_workers")
    add_ray_arguments(p)
    p.set_defaults(func=run)
    return p


def train_values(args: argparse.Namespace) -> dict:
    """The command's own flags as config values (``None``: not given)."""
    return {"manifest": args.manifest, "storage_path": args.storage_path, "max_steps": args.max_steps,
            "num_workers": args.num_workers}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pipelines.train_customizer import run_training

    config = load_config("train", args.config, args.set, train_values(args))
    # before Ray starts: checkpoints that cannot be stored fail in one line, not after the first steps
    check_writable(config.storage_path, IOConfig(storage_options=config.storage_options))
    logging.basicConfig(level=logging.INFO)
    init_ray(args.address, args.num_cpus)
    result = run_training(config)
    print(json.dumps(result, indent=2, default=str))
    return 0

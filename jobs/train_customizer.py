"""``stylid train-customizer --config configs/train_facesnap.yaml``: train FaceSnap's modules on Ray Train."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

import yaml

from jobs.ray_cluster import init_ray

if TYPE_CHECKING:  # torch and diffusers load only when this command runs, not with every ``stylid`` command
    from stylid_core.customize.facesnap.training import FaceSnapTrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-customizer`` on the ``stylid`` CLI."""
    p = subparsers.add_parser("train-customizer", help="train the FaceSnap customizer (Ray Train)")
    p.add_argument("--config", required=True, help="YAML with a FaceSnapTrainConfig (optionally under 'train:')")
    p.add_argument("--manifest", help="override train.manifest")
    p.add_argument("--storage-path", help="override train.storage_path (any fsspec URI)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--num-workers", type=int, help="override train.num_workers")
    p.add_argument(
        "--address", dest="ray_address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)"
    )
    p.set_defaults(func=run)
    return p


def load_config(path: str, overrides: dict[str, Any] | None = None) -> FaceSnapTrainConfig:
    import fsspec

    with fsspec.open(path, "r") as f:
        data = yaml.safe_load(f) or {}
    if "train" in data:
        data = data["train"]
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    from stylid_core.customize.facesnap.training import FaceSnapTrainConfig

    return FaceSnapTrainConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    from pipelines.train_customizer import run_training

    config = load_config(
        args.config,
        {
            "manifest": args.manifest,
            "storage_path": args.storage_path,
            "max_steps": args.max_steps,
            "num_workers": args.num_workers,
        },
    )
    logging.basicConfig(level=logging.INFO)
    init_ray(args.ray_address)
    result = run_training(config)
    print(json.dumps(result, indent=2, default=str))
    return 0

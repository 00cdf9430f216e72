"""``stylid compact OUTPUT``: rewrite an output's small metrics and faces shards into shards of thousands of rows."""

from __future__ import annotations

import argparse
import json

from stylid_core.lease import OutputLease
from stylid_core.ledger import DEFAULT_ROWS_PER_SHARD, compact


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compact",
        help="merge an output's small metrics/faces shards (earlier versions, many small reruns) into row-sized ones",
    )
    p.add_argument("output", help="the --output of a stylid run or customize (folder or URI)")
    p.add_argument(
        "--rows-per-shard",
        type=int,
        default=DEFAULT_ROWS_PER_SHARD,
        help=f"rows per shard (default: {DEFAULT_ROWS_PER_SHARD}); shards under half of it are merged",
    )
    p.add_argument("--storage-options", default="{}", help="fsspec storage options as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    options = json.loads(args.storage_options)
    with OutputLease(args.output, options):  # a run writing into the output meanwhile: refused (LeaseHeld, exit 2)
        result = compact(args.output, options, args.rows_per_shard)
    print(
        f"stylid compact: {result.rows} rows, {result.shards_before} metrics shards -> {result.shards_after}"
        f" ({result.groups} merged groups"
        + (f", {result.recovered} interrupted compaction(s) finished first" if result.recovered else "")
        + ")"
    )
    return 0

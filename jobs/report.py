"""``stylid report OUTPUT``: (re)write ``report.html`` for a finished or partial run."""

from __future__ import annotations

import argparse
import json

from stylid_core.report import write_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write report.html for an output folder or URI")
    p.add_argument("output", help="the --output of a stylid run")
    p.add_argument("--storage-options", default="{}", help="fsspec storage options as JSON")
    p.add_argument("--max-thumbs", type=int, default=24)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    uri = write_report(args.output, json.loads(args.storage_options), args.max_thumbs)
    print(f"report: {uri}")
    return 0

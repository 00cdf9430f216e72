"""The ``stylid`` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from jobs.arrow_memory import use_jemalloc
from stylid_core.config import ConfigError
from stylid_core.secrets import scrub, secret_values, secrets_in_overrides

#: modules exposing ``add_parser(subparsers)``; each sets ``func`` on its parser
SUBCOMMANDS = ("jobs.run", "jobs.report", "jobs.customize", "jobs.train_customizer", "jobs.compact", "jobs.score")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylid", description="Identity-preserving portrait stylization at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    use_jemalloc()
    try:
        return args.func(args)
    except (ConfigError, ValueError) as exc:
        secrets = secret_values() | secrets_in_overrides(getattr(args, "set", None) or [])
        print(scrub(f"stylid {args.command}: error: {exc}", secrets), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``stylid`` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from jobs.arrow_memory import use_jemalloc
from stylid_core.config import ConfigError
from stylid_core.secrets import scrub, secret_values, secrets_in_overrides

#: modules exposing ``add_parser(subparsers)``; each sets ``func`` on its parser
SUBCOMMANDS = ("jobs.run", "jobs.report", "jobs.customize", "jobs.train_customizer", "jobs.compact", "jobs.score")
SUBCOMMANDS += ("jobs.canary",)  # stylid canary: pick a canary manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylid", description="Identity-preserving portrait stylization at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


#: path arguments that, given empty (``--output "$UNSET"``), would fall back to the current folder or the sample
_PATH_ARGUMENTS = ("output", "manifest", "baseline", "history", "storage_path", "config")


def check_path_arguments(args: argparse.Namespace) -> None:
    """Refuse an empty or blank path argument (``ValueError``): ``--output ""`` wrote ``metrics/``, ``run.json``
    and ``_SUCCESS`` into the current folder, and ``--manifest ""`` ran the bundled sample."""
    for name in _PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            flag = "OUTPUT" if name == "output" and args.command in ("compact", "report") else f"--{name}"
            flag = flag.replace("_", "-")
            raise ValueError(f"{flag} is empty (an unset variable?): give a folder or URI")


#: errors of the output's storage that no retry mends: they end the job with one line, not a traceback
STORAGE_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_failure(exc: BaseException) -> OSError | None:
    """The disk-full, quota, read-only or permission ``OSError`` behind ``exc`` (through ``raise ... from``, Ray's
    task errors and exception groups), or None."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_FULL_OR_READ_ONLY:
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), *getattr(e, "exceptions", ())]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    use_jemalloc()
    try:
        check_path_arguments(args)
        return args.func(args)
    except (ConfigError, ValueError) as exc:
        secrets = secret_values() | secrets_in_overrides(getattr(args, "set", None) or [])
        print(scrub(f"stylid {args.command}: error: {exc}", secrets), file=sys.stderr)
        return 2
    except Exception as exc:
        failure = storage_failure(exc)
        if failure is None:
            raise
        where = getattr(args, "output", None) or "the output"
        what = failure.strerror or type(failure).__name__
        path = f" ({failure.filename})" if failure.filename else ""
        secrets = secret_values() | secrets_in_overrides(getattr(args, "set", None) or [])
        print(scrub(f"stylid {args.command}: error: output {where}: {what}{path}; the rows written so far are"
                    " consistent, rerun when there is room to write", secrets), file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())

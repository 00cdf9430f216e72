"""Rewrite a wheel without some of its folders (and their RECORD lines), so it travels in less space.

    python scripts/trim_wheel.py .whl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl ray/jars/ ray/rllib/

The wheel keeps its file name (pip installs it as usual); members under each PREFIX are left out, everything else is
copied byte for byte, recompressed at deflate level 9. Used by ``prepare_gpu_wheels.sh`` for Ray, whose Java jars,
RLlib, Serve, LLM and dashboard web build are not needed to run a local Ray Data job.
"""

from __future__ import annotations

import argparse
import os
import zipfile


def trim_wheel(path: str, prefixes: list[str]) -> tuple[int, int, int]:
    """Drop the members under ``prefixes``; returns (members dropped, bytes before, bytes after)."""
    before = os.path.getsize(path)
    tmp = path + ".tmp"
    dropped = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if any(info.filename.startswith(p) for p in prefixes):
                dropped += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not any(line.startswith(p) for p in prefixes)).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, path)
    return dropped, before, os.path.getsize(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel")
    p.add_argument("prefixes", nargs="+", help="member path prefixes to leave out, e.g. ray/jars/")
    args = p.parse_args(argv)
    dropped, before, after = trim_wheel(args.wheel, args.prefixes)
    name = os.path.basename(args.wheel)
    print(f"{name}: {dropped} members dropped, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

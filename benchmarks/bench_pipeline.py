"""Throughput of the CPU pipeline under Ray against a plain loop, and peak memory as the dataset grows.

1. Throughput: the bundled sample, repeated, through the default configuration (dlib faces, classical engine with
   mosaic, scoring), once as a Ray Data job on a local Ray with ``--cores`` CPUs and once as a single-process loop
   calling the very same stage classes batch by batch. It prints images/s of each and the ratio
   ``(ray images/s / cores) / (loop images/s)``: the share of a perfect per-core speed-up Ray delivers.
2. Memory: peak RSS of the whole run (driver, raylet, GCS, every worker: the driver's process tree, sampled every
   0.2 s) at ``--rss-rows`` rows each (default 1000 and 10000), in a fresh Ray per size, with a cheap configuration
   (mostly face-free 64 px tiles, one portrait thumbnail per 100 rows, no re-detection or no-mosaic comparison), so
   the figure measures the streaming machinery rather than the models. Target: flat within 15%.

    python benchmarks/bench_pipeline.py                  # both parts
    python benchmarks/bench_pipeline.py --skip-rss       # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stylid_core.config import JobConfig  # noqa: E402
from stylid_core.sample_data import background, load_photo, write_sample_set  # noqa: E402


def write_manifest(rows: list[dict], path: str) -> str:
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), path)
    return path


def repeated_sample(directory: str, repeats: int) -> str:
    base = write_sample_set(os.path.join(directory, "sample"))
    rows = [{"image_id": f"{r['image_id']}-{k}", "image_uri": r["image_uri"]} for k in range(repeats) for r in base]
    return write_manifest(rows, os.path.join(directory, f"sample_x{repeats}.parquet"))


def manifest_frame(manifest: str, style_uri: str | None) -> pd.DataFrame:
    """The whole prepared manifest as one frame (the manifest reader's batches, joined; styles as plain strings)."""
    from pipelines.manifest import ManifestReader

    table = pa.concat_tables(list(ManifestReader(manifest, style_uri)))
    style = table.column("style_uri")
    if pa.types.is_dictionary(style.type):  # the reader's one-style-a-batch encoding
        table = table.set_column(table.column_names.index("style_uri"), "style_uri", style.cast(pa.string()))
    return table.to_pandas()


def loop_run(config: JobConfig, manifest: str, output: str) -> tuple[int, float]:
    """The same stages, called batch by batch in this process."""
    from pipelines.stages import FaceStage, LoadStage, ScoreStage, StylizeStage, WriteStage
    from stylid_core.ledger import ShardWriter

    t0 = time.perf_counter()
    rows = manifest_frame(manifest, config.stylize.style_uri)
    stages = [
        LoadStage(config.io),
        FaceStage(config.faces),
        StylizeStage(config.stylize, config.score, config.io),
        ScoreStage(config.faces, config.score, config.io),
        WriteStage(output, config.config_hash(), "", config.io),
    ]
    n = 0
    bs = config.resources.faces.batch_size
    writer = ShardWriter(output, config.io.storage_options, config.io.rows_per_shard)
    for k in range(0, len(rows), bs):
        batch = rows.iloc[k : k + bs].reset_index(drop=True)
        for stage in stages:
            table = stage(batch)
            batch = table.to_pandas()
        writer.add(table)  # the shards, as the job's driver writes them
        n += len(batch)
    writer.flush()
    return n, time.perf_counter() - t0


def ray_run(config: JobConfig, manifest: str, output: str) -> tuple[int, float]:
    from pipelines.stylize import run_stylize

    result = run_stylize(config, manifest, output)
    return result.processed, result.seconds


def throughput(cores: int, repeats: int) -> dict:
    from jobs.ray_cluster import init_ray

    config = JobConfig()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = repeated_sample(tmp, repeats)
        # the loop is the one-core baseline: pinned to one CPU, OpenCV on one thread (as the stages set it)
        all_cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(all_cpus)})
        n_loop, s_loop = loop_run(config, manifest, os.path.join(tmp, "loop"))
        os.sched_setaffinity(0, all_cpus)
        init_ray(num_cpus=cores, quiet=True)
        n_ray, s_ray = ray_run(config, manifest, os.path.join(tmp, "ray"))
    loop_ips, ray_ips = n_loop / s_loop, n_ray / s_ray
    return {
        "rows": n_ray, "cores": cores, "loop_s": s_loop, "ray_s": s_ray, "loop_ips": loop_ips, "ray_ips": ray_ips,
        "ratio_per_core": ray_ips / cores / loop_ips,
    }  # fmt: skip


def cheap_manifest(directory: str, rows: int) -> str:
    tiles = []
    bg = background(640, 64)
    for k in range(8):
        path = os.path.join(directory, f"tile{k}.png")
        Image.fromarray(np.ascontiguousarray(bg[:, k * 64 : (k + 1) * 64])).save(path)
        tiles.append(path)
    portraits = []
    for stem in ("obama", "biden", "grace_hopper"):
        img = Image.fromarray(load_photo(stem))
        img.thumbnail((360, 360))
        path = os.path.join(directory, f"{stem}.jpg")
        img.save(path, quality=90)
        portraits.append(path)
    out = []
    for k in range(rows):
        uri = portraits[(k // 100) % len(portraits)] if k % 100 == 0 else tiles[k % len(tiles)]
        out.append({"image_id": f"r{k:07d}", "image_uri": uri})
    return write_manifest(out, os.path.join(directory, f"cheap_{rows}.parquet"))


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def rss_child(rows: int, cores: int) -> None:
    """Run the cheap job on ``rows`` rows in this process's own Ray; print JSON with the peak RSS."""
    from jobs.ray_cluster import init_ray
    from jobs.run import run_job

    config = JobConfig.from_dict({
        "faces": {"upsample": 0}, "score": {"redetect": False, "compare_without_mosaic": False},
        "resources": {"load": {"batch_size": 16}, "write": {"batch_size": 64}},
    })  # fmt: skip
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            time.sleep(0.2)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = cheap_manifest(tmp, rows)
        init_ray(num_cpus=cores, quiet=True)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        info = run_job(config, os.path.join(tmp, "out"), manifest, report=False)
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
    print(json.dumps({"rows": rows, "peak_rss_mb": peak[0] / 2**20, "seconds": seconds,
                      "status": info["summary"]["status_counts"]}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--repeats", type=int, default=20, help="copies of the 9-image sample for throughput (20: 180 rows)"
    )
    parser.add_argument("--rss-rows", default="1000,10000")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.cores)
        return
    if not args.skip_throughput:
        r = throughput(args.cores, args.repeats)
        print(f"throughput, default config, {r['rows']} rows (bundled sample x{args.repeats}):")
        print(f"  single-process loop: {r['loop_ips']:.3f} images/s ({r['loop_s']:.1f} s)")
        print(f"  Ray Data, {r['cores']} CPUs:   {r['ray_ips']:.3f} images/s ({r['ray_s']:.1f} s)")
        print(f"  ratio per core (ray/cores/loop): {r['ratio_per_core']:.2f}  (target >= 0.9)")
    if not args.skip_rss:
        results = []
        for rows in (int(x) for x in args.rss_rows.split(",")):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(rows), "--cores", str(args.cores)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"peak RSS, cheap config, {r['rows']} rows: {r['peak_rss_mb']:.0f} MiB in {r['seconds']:.0f} s "
                  f"({r['rows'] / r['seconds']:.0f} rows/s) statuses {r['status']}")  # fmt: skip
        if len(results) >= 2:
            growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1
            print(
                f"  RSS growth {results[0]['rows']} -> {results[-1]['rows']} rows: {100 * growth:+.1f}% "
                "(target within 15%)"
            )


if __name__ == "__main__":
    main()

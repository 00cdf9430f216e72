"""Faults survived at dataset size, and memory per worker.

1. Faults: a 500-row run (cheap configuration: one small portrait in four rows, face-free tiles otherwise, no
   re-detection or no-mosaic comparison) from and to S3 (moto's server on 127.0.0.1), each run a ``stylid run``
   process with its own local Ray (2 CPUs). First clean; then through the fault-injecting proxy
   (``tests/faultproxy.py``: 5% of S3 requests answered 503) alone; then with all the faults: the proxy, one stage
   actor SIGKILLed once the first rows are written, the driver SIGKILLed once 40% of the images are written, and the
   job rerun through the proxy. Then the outage and concurrency cases: every image read failing for a whole run,
   every request failing for 10 s mid-run, and two runs started together into one output, each followed by a
   rerun, counting rows lost and doubled. Printed: rows in and out, ids once, face rows without orphans, the
   proxy's counts, the extra wall time each fault costs against the clean run, and the peak RSS of each kind of
   worker process.
2. Memory per image: one 16 MP photo (4896 x 3264 JPEG with a 400 px face) through the default stages (load,
   faces, stylize with mosaic, score, write) in a fresh process, once at full resolution (``io.max_work_pixels``
   as large as ``io.max_pixels``: before) and once at the default working resolution (after): peak RSS of that
   process, the stage actor's work, and the same for a 4 MP photo for scale.

    python benchmarks/bench_faults.py                    # both parts
    python benchmarks/bench_faults.py --part memory      # memory only
    python benchmarks/bench_faults.py --part outage      # the outage and concurrency cases only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import psutil
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stylid_core.sample_data import background, load_photo, place_face  # noqa: E402

BUCKET = "bench-faults"
CHEAP = ["--set", "score.redetect=false", "--set", "score.compare_without_mosaic=false", "--set", "faces.upsample=1"]


# -- part 2: memory per image -------------------------------------------------------------------------------------


def photo(width: int, height: int, face_px: int) -> bytes:
    """A JPEG of ``width`` x ``height`` with one real face ``face_px`` wide on a face-free background."""
    scene = background(width, height).copy()
    place_face(scene, "obama", face_px, (width // 2, height // 2))
    buf = io.BytesIO()
    Image.fromarray(scene).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def one_image(path: str, max_work_pixels: int) -> None:
    """(In a fresh process.) Run one image through the fused stages; print JSON with the peak RSS."""
    from pipelines.stages import FusedCPUStage, prepare_rows
    from pipelines.stylize import stylize_chain
    from stylid_core.config import JobConfig

    config = JobConfig.from_dict({"io": {"max_work_pixels": max_work_pixels}})
    out = tempfile.mkdtemp()
    stage = FusedCPUStage([(s.cls, s.kwargs) for s in stylize_chain(config, out, key_suffix="")])
    after_load = psutil.Process().memory_info().rss
    rows = prepare_rows(pd.DataFrame([{"image_id": "big", "image_uri": path}]), None)
    t0 = time.perf_counter()
    row = stage(rows).to_pandas().iloc[0]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with Image.open(os.path.join(out, "images", "big.png")) as img:
        written = img.size
    work = [int(row["width"]), int(row["height"])]
    print(json.dumps({"status": row["status"], "n_faces": int(row["n_faces"] or 0), "seconds": seconds,
                      "rss_after_models": after_load, "peak_rss": peak, "work": work, "written": list(written),
                      "id_sim": row["id_sim_mean"]}))  # fmt: skip


def memory_part() -> None:
    tmp = tempfile.mkdtemp()
    print("memory per image: one photo through load, faces, stylize (mosaic), score, write, in a fresh process")
    print(f"{'photo':>18} | {'io.max_work_pixels':>18} | {'worked at':>11} | {'written':>11} | status | faces | "
          f"{'s':>6} | RSS after models MiB | peak RSS MiB | work MiB")  # fmt: skip
    for (w, h, face), label in (((4896, 3264, 400), "16 MP"), ((2448, 1632, 200), "4 MP")):
        path = os.path.join(tmp, f"{label.replace(' ', '')}.jpg")
        with open(path, "wb") as f:
            f.write(photo(w, h, face))
        for limit, name in ((64_000_000, "64000000 (before)"), (None, "default (after)")):
            from stylid_core.config import IOConfig

            limit = limit or IOConfig().max_work_pixels
            cmd = [sys.executable, os.path.abspath(__file__), "--one-image", path, "--max-work-pixels", str(limit)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
                                  check=True)  # fmt: skip
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mib = lambda b: b / 2**20  # noqa: E731
            print(f"{label + f' {w}x{h}':>18} | {name:>18} | {'x'.join(map(str, r['work'])):>11} | "
                  f"{'x'.join(map(str, r['written'])):>11} | {r['status']:>6} | {r['n_faces']:>5} | "
                  f"{r['seconds']:6.1f} | {mib(r['rss_after_models']):19.0f} | {mib(r['peak_rss']):12.0f} | "
                  f"{mib(r['peak_rss'] - r['rss_after_models']):8.0f}")  # fmt: skip


# -- part 1: faults ----------------------------------------------------------------------------------------------


class Sampler:
    """Peak RSS of every process under the given roots, sampled every 0.2 s, by kind (worker title or name)."""

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def kind(p: psutil.Process) -> str:
        title = " ".join(p.cmdline())
        if "FusedCPUStage" in title:
            return "stage actor (load+faces+stylize+score+write)"
        if title.startswith("ray::"):
            return title.split()[0].split(".")[0]  # the actor or task, not the method it runs right now
        if "jobs.cli" in title:
            return "driver (stylid run)"
        return p.name()

    def _run(self) -> None:
        while not self._stop.is_set():
            for root in list(self.roots):
                try:
                    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        k, rss = self.kind(p), p.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peak[k] = max(self.peak.get(k, 0), rss)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cheap_manifest(client, rows: int) -> str:
    tiles = []
    bg = background(640, 64)
    for k in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(bg[:, k * 64 : (k + 1) * 64])).save(buf, format="PNG")
        client.put_object(Bucket=BUCKET, Key=f"in/tile{k}.png", Body=buf.getvalue())
        tiles.append(f"s3://{BUCKET}/in/tile{k}.png")
    portraits = []
    for stem in ("obama", "biden", "grace_hopper"):
        img = Image.fromarray(load_photo(stem))
        img.thumbnail((200, 200))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        client.put_object(Bucket=BUCKET, Key=f"in/{stem}.jpg", Body=buf.getvalue())
        portraits.append(f"s3://{BUCKET}/in/{stem}.jpg")
    out = [{"image_id": f"row{k:04d}", "image_uri": portraits[k // 4 % 3] if k % 4 == 0 else tiles[k % 8]}
           for k in range(rows)]  # fmt: skip
    buf = io.BytesIO()
    pd.DataFrame(out).to_parquet(buf, index=False)
    client.put_object(Bucket=BUCKET, Key="manifest.parquet", Body=buf.getvalue())
    return f"s3://{BUCKET}/manifest.parquet"


def count(client, prefix: str) -> int:
    n, token = 0, None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
        n += r.get("KeyCount", 0)
        if not r.get("IsTruncated"):
            return n
        token = r["NextContinuationToken"]


def run_cli(manifest: str, output: str, endpoint: str, sampler: Sampler, on_progress=None) -> tuple[float, int]:
    """One ``stylid run`` process against ``endpoint``; ``on_progress(proc)`` is polled while it runs (it may kill
    things). Returns (seconds, exit status); what is left of its process tree afterwards is killed by PID."""
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "HF_HUB_OFFLINE": "1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--manifest", manifest, "--output", output, "--num-cpus", "2",
           "--no-report", *CHEAP]  # fmt: skip
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler.roots.append(proc.pid)
    family: dict[int, psutil.Process] = {proc.pid: proc}
    while proc.poll() is None:
        try:
            family.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
        if on_progress is not None:
            on_progress(proc)
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    for p in family.values():  # Ray processes of a killed driver: ended here, by PID
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(family.values()), timeout=20)
    return seconds, proc.returncode


def check_output(client, output_key: str, rows: int) -> dict:
    metrics, faces = _shards_frame(client, f"{output_key}/metrics/"), _shards_frame(client, f"{output_key}/faces/")
    ok = metrics[metrics["status"] == "ok"]
    counts = faces.groupby("image_id").size() if len(faces) else pd.Series(dtype=int)
    return {
        "rows_out": len(metrics),
        "ids_once": bool(metrics["image_id"].is_unique and len(metrics) == rows),
        "statuses": metrics["status"].value_counts().to_dict(),
        "orphan_face_rows": int((~faces["image_id"].isin(ok["image_id"])).sum()) if len(faces) else 0,
        "face_rows_match_n_faces": bool(all(int(counts.get(i, 0)) == int(n) for i, n in zip(ok["image_id"],
                                                                                             ok["n_faces"]))),
    }  # fmt: skip


def lost_and_doubled(client, output_key: str, rows: int) -> dict:
    """After the last run into an output: ids of the manifest with no row or whose only rows failed for a transient
    cause (``lost``), and metrics rows beyond one per id (``doubled``)."""
    r = check_output(client, output_key, rows)
    metrics = _metrics_frame(client, output_key)
    ids = set(metrics["image_id"]) if len(metrics) else set()
    transient = {"read_error", "write_error", "timeout"}
    failed = set(metrics.loc[metrics["status"].isin(transient), "image_id"]) if len(metrics) else set()
    return {"lost": (rows - len(ids)) + len(failed), "doubled": len(metrics) - len(ids), "statuses": r["statuses"]}


def _shards_frame(client, prefix: str) -> pd.DataFrame:
    """Every Parquet shard under ``prefix`` of the bench's bucket, as one frame (empty when there is none)."""
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
        keys += [o["Key"] for o in r.get("Contents", []) if o["Key"].endswith(".parquet")]
        if not r.get("IsTruncated"):
            break
        token = r["NextContinuationToken"]
    parts = [pd.read_parquet(io.BytesIO(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in keys]
    return pd.concat(parts) if parts else pd.DataFrame()


def _metrics_frame(client, output_key: str) -> pd.DataFrame:
    return _shards_frame(client, f"{output_key}/metrics/")


def outage_and_concurrency(client, manifest: str, endpoint: str, rows: int, sampler: Sampler) -> dict:
    """Issue "Hostile and careless input", items 4 and 6, at the bench's size: a storage outage for a whole run
    (every image read answered 503), one of 10 s in the middle of a run (every request), and two ``stylid run``
    processes started together into one output; each followed by one plain rerun. Counted in the end: rows lost
    and rows doubled (the target is 0 of each)."""
    from tests.faultproxy import FaultProxy

    out: dict = {}
    with FaultProxy(endpoint, fail_share=1.0, paths=("/in/",), lifetime_s=1800) as proxy:
        _, rc = run_cli(manifest, f"s3://{BUCKET}/outage", proxy.url, sampler)
        first = check_output(client, "outage", rows)["statuses"]
    _, rc2 = run_cli(manifest, f"s3://{BUCKET}/outage", endpoint, sampler)
    out["outage, whole run"] = {"first": f"exit {rc}, {first}", "rerun_rc": rc2,
                                **lost_and_doubled(client, "outage", rows)}  # fmt: skip

    with FaultProxy(endpoint, lifetime_s=1800) as proxy:
        state = {"down_at": None}

        def outage(proc: psutil.Process) -> None:
            now = time.perf_counter()
            if state["down_at"] is None and count(client, "midrun/images/") >= 5:
                proxy.fail_share, state["down_at"] = 1.0, now
            elif state["down_at"] is not None and now - state["down_at"] >= 10:
                proxy.fail_share = 0.0

        _, rc = run_cli(manifest, f"s3://{BUCKET}/midrun", proxy.url, sampler, outage)
        first = check_output(client, "midrun", rows)["statuses"]
    _, rc2 = run_cli(manifest, f"s3://{BUCKET}/midrun", endpoint, sampler)
    out["outage 10 s mid-run"] = {"first": f"exit {rc}, {first}", "rerun_rc": rc2,
                                  **lost_and_doubled(client, "midrun", rows)}  # fmt: skip

    codes: list = [None, None]

    def one(k: int) -> None:
        codes[k] = run_cli(manifest, f"s3://{BUCKET}/together", endpoint, sampler)[1]

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = check_output(client, "together", rows)["statuses"]
    _, rc2 = run_cli(manifest, f"s3://{BUCKET}/together", endpoint, sampler)
    out["two runs at once"] = {"first": f"exits {sorted(codes)}, {first}", "rerun_rc": rc2,
                               **lost_and_doubled(client, "together", rows)}  # fmt: skip
    return out


def faults_part(rows: int, fail_share: float, only_outage: bool = False) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.faultproxy import FaultProxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    manifest = cheap_manifest(client, rows)
    ok_images = (rows + 3) // 4
    sampler = Sampler()
    results = {}
    if only_outage:
        results = outage_and_concurrency(client, manifest, endpoint, rows, sampler)
        sampler.stop()
        server.stop()
        print(f"outage and concurrency: {rows} rows (cheap config, 1 portrait in 4), S3 on moto, local Ray of 2 CPUs")
        for name, r in results.items():
            print(f"  {name}: first run(s) {r['first']}; after the rerun (exit {r['rerun_rc']}): lost {r['lost']},"
                  f" doubled {r['doubled']} (target 0 and 0), statuses {r['statuses']}")  # fmt: skip
        return

    clean_s, rc = run_cli(manifest, f"s3://{BUCKET}/clean", endpoint, sampler)
    results["clean"] = {"seconds": clean_s, "rc": rc, **check_output(client, "clean", rows)}

    with FaultProxy(endpoint, fail_share=fail_share, seed=5, lifetime_s=1800) as proxy:
        s3_s, rc = run_cli(manifest, f"s3://{BUCKET}/s3faults", proxy.url, sampler)
        results["5% S3 503s"] = {"seconds": s3_s, "rc": rc, **proxy.stats(), **check_output(client, "s3faults", rows)}

    with FaultProxy(endpoint, fail_share=fail_share, seed=6, lifetime_s=1800) as proxy:
        state = {"actor_killed": None, "driver_killed": None}

        def faults(proc: psutil.Process) -> None:
            written = count(client, "all/images/")
            if state["actor_killed"] is None and written >= 1:
                for p in proc.children(recursive=True):
                    try:
                        if "FusedCPUStage" in " ".join(p.cmdline()):
                            p.kill()
                            state["actor_killed"] = written
                            break
                    except psutil.Error:
                        continue
            if state["actor_killed"] is not None and state["driver_killed"] is None and written >= 0.4 * ok_images:
                proc.kill()
                state["driver_killed"] = written

        first_s, rc1 = run_cli(manifest, f"s3://{BUCKET}/all", proxy.url, sampler, faults)
        in_ledger = check_output(client, "all", rows)["rows_out"]
        rerun_s, rc2 = run_cli(manifest, f"s3://{BUCKET}/all", proxy.url, sampler)
        results["all faults"] = {
            "seconds": first_s + rerun_s, "first_s": first_s, "rerun_s": rerun_s, "rc": [rc1, rc2],
            "images_when_actor_killed": state["actor_killed"], "images_when_driver_killed": state["driver_killed"],
            "rows_in_ledger_at_crash": in_ledger, **proxy.stats(), **check_output(client, "all", rows),
        }  # fmt: skip
    results.update(outage_and_concurrency(client, manifest, endpoint, rows, sampler))
    sampler.stop()
    server.stop()

    print(f"fault run: {rows} rows (cheap config, 1 portrait in 4), S3 on moto, stylid run with a local Ray of 2 CPUs")
    for name, r in results.items():
        extra = r["seconds"] - results["clean"]["seconds"]
        print(f"  {name:>12}: {r['seconds']:6.1f} s (extra {extra:+6.1f} s), exit {r['rc']}, rows in {rows} / out "
              f"{r['rows_out']}, ids once {r['ids_once']}, orphan face rows {r['orphan_face_rows']}, face rows = "
              f"n_faces {r['face_rows_match_n_faces']}, statuses {r['statuses']}")  # fmt: skip
        if "requests" in r:
            print(f"{'':>16}proxy: {r['requests']} requests, {r['failed']} answered 503")
    for name in ("outage, whole run", "outage 10 s mid-run", "two runs at once"):
        r = results[name]
        print(f"  {name}: first run(s) {r['first']}; after the rerun: lost {r['lost']}, doubled {r['doubled']}"
              f" (target 0 and 0), statuses {r['statuses']}")  # fmt: skip
    a = results["all faults"]
    print(f"  all faults: actor killed at {a['images_when_actor_killed']} images written, driver killed at "
          f"{a['images_when_driver_killed']} ({a['rows_in_ledger_at_crash']} rows in the ledger); first run "
          f"{a['first_s']:.1f} s, rerun {a['rerun_s']:.1f} s")  # fmt: skip
    print("  peak RSS by process kind (all runs):")
    for kind, rss in sorted(sampler.peak.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {rss / 2**20:7.0f} MiB  {kind}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "faults", "outage", "memory"), default="all")
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--fail-share", type=float, default=0.05)
    p.add_argument("--one-image", help=argparse.SUPPRESS)
    p.add_argument("--max-work-pixels", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_image:
        one_image(args.one_image, args.max_work_pixels)
        return
    if args.part in ("all", "faults", "outage"):
        faults_part(args.rows, args.fail_share, only_outage=args.part == "outage")
    if args.part in ("all", "memory"):
        memory_part()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()

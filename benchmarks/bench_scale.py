"""Dataset scale: row-sized shards, the ledger at a million rows, a ten-million-row plan (issue 10).

Three parts, each run in fresh processes (so peak RSS is the run's own):

``pipeline``  The real job (``stylid run``'s ``run_job``) with the cheap ``stylize_null`` config: 32 px face crops
              cut from the bundled portraits, one centred face each, the identity stylizer, so what is measured is
              the pipeline itself. Per size: rows/s and pipeline ms per row per core, objects written other than
              images, bytes of metrics and faces, the driver's and the workers' peak RSS, the time a rerun of the
              finished output takes to find nothing to do, and (``--crash``) a run killed (SIGKILL, driver and its
              local Ray) once half the rows are in the ledger, then the resume: its time and rows redone.
``ledger``    A finished output of ``--rows`` rows synthesized with the job's own shard writer (metrics and faces
              shards of ``io.rows_per_shard`` rows, realistic columns; no images), then a rerun of the whole job
              over a manifest of the same rows: the time to find nothing to do, on local disk and (``--s3``) on
              moto's S3 server on 127.0.0.1.
``stages``    The fused actor (``FusedCPUStage``: load, faces, stylize, score, write) in this one process on
              ``--rows`` rows, in the job's batches: the whole cost per row on one core, and its split, measured by
              timing every call into model work (face detector and embedder, stylizer, the metric kernels
              ``colour_distance`` / ``content_similarity``) against the rest, the pipeline's own cost (reads, decode,
              per-row bookkeeping, JSON, zoom strips, PNG encode, puts, Arrow conversions). The issue's target
              (<= 1 ms per row per core) is for the pipeline's own figure.
``plan``      A manifest of ``--manifest-rows`` rows (a prefix of Parquet files) and a ledger of ``--done-rows``:
              the driver's peak RSS and the time to read, validate and plan the run (``iter_manifest`` +
              ``plan_pending``: the done rows subtracted), without processing.

    python benchmarks/bench_scale.py pipeline --rows 10000 100000 --cpus 2 --crash
    python benchmarks/bench_scale.py pipeline --rows 10000 --cpus 1
    python benchmarks/bench_scale.py pipeline --rows 100000 --cpus 1 --pin   # the job on 1 of the machine's cores
    python benchmarks/bench_scale.py ledger --rows 1000000 --s3
    python benchmarks/bench_scale.py stages --rows 5000
    python benchmarks/bench_scale.py plan --manifest-rows 10000000 --done-rows 5000000
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipelines.schema import COLUMNS, FACE_COLUMNS, METRICS_COLUMNS  # noqa: E402
from stylid_core.ledger import DEFAULT_ROWS_PER_SHARD, ShardWriter, done_ids  # noqa: E402

CONFIG = "stylize_null"
#: set (by ``pipeline --pin``) for a job child to confine itself and all it starts to its first ``--cpus`` cores
PIN_ENV = "STYLID_BENCH_PIN"
CROPS = 1000  # distinct images; rows cycle over them (each row its own id, its own output image)


# ------------------------------------------------------------------------------------------- inside a child


def _shmem(pid: int) -> int:
    """A process's resident shared-memory pages (``RssShmem``: for a Ray worker, the object store's)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(ln for ln in f if ln.startswith("RssShmem"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def _role(title: str) -> str:
    """What a process of the local Ray does, from its title: a Ray worker's ``ray::...`` names its task or actor
    (a worker's title changes as it takes other work), the rest are Ray's own processes (raylet, gcs_server,
    the dashboard's and runtime env's agents)."""
    if title.startswith("ray::"):
        title = title[5:]
        for short in ("FusedCPUStage", "ShardWriterActor", "ReadPendingRows", "IDLE"):
            if short in title:
                return short
        return title.split(" ")[0][:40]
    words = title.split(" ")
    if os.path.basename(words[0]).startswith("python"):  # a Python process of Ray's: named by its script
        scripts = [w for w in words[1:] if w.endswith(".py")]
        return os.path.basename(scripts[0]) if scripts else "python"
    return os.path.basename(words[0])[:40] or "?"


def _busy_s(t) -> float:
    """The machine's busy CPU seconds in ``psutil.cpu_times()`` (every process's, not idle or waiting on I/O)."""
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


class ProcessWatch:
    """Peak RSS of this process and of its Ray worker processes (``ray::...``), sampled every 0.2 s; for the worker
    at its peak, how much of it was Ray's object store (shared memory pages: the blocks it read and wrote). And
    where the cores went: every process of this one's tree, its CPU seconds (user + system) by role (``_role``),
    a process's CPU between two samples counted to the role it had at the second."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.worker_peak = 0
        self.worker_peak_shmem = 0
        self.cpu_by_role: dict[str, float] = {}
        self._cpu_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, count: bool = True) -> None:
        """One look at the tree; ``count=False`` only notes each process's CPU so far (those already running when
        the watch starts: Ray started before the job, its start-up not the job's)."""
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    title = " ".join(p.cmdline()) or p.name()
                    t = p.cpu_times()
                    used = t.user + t.system
                    rss = p.memory_info().rss
                if title.startswith("ray::") and rss > self.worker_peak:
                    self.worker_peak, self.worker_peak_shmem = rss, _shmem(p.pid)
                if count:
                    role = _role(title)
                    self.cpu_by_role[role] = self.cpu_by_role.get(role, 0.0) + used - self._cpu_seen.get(p.pid, 0.0)
                self._cpu_seen[p.pid] = used
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.NoSuchProcess):
                self._sample()
            self._stop.wait(0.2)

    def __enter__(self) -> ProcessWatch:
        t = self.me.cpu_times()
        self._driver_cpu0 = t.user + t.system
        self._machine0 = psutil.cpu_times()
        self._t0 = time.perf_counter()
        with contextlib.suppress(psutil.NoSuchProcess):
            self._sample(count=False)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(psutil.NoSuchProcess):
            self._sample()  # the last CPU seconds of the processes still there
        t = self.me.cpu_times()
        self.cpu_by_role["driver"] = t.user + t.system - self._driver_cpu0
        self.machine_busy_s = _busy_s(psutil.cpu_times()) - _busy_s(self._machine0)  # the job's and others'
        self.elapsed_s = time.perf_counter() - self._t0

    @staticmethod
    def driver_peak() -> int:
        """This process's own peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries that over ``exec``, so a
        child's figure could never be below its parent's RSS at the fork (the bench's, holding the synthesized
        manifest and ledger)."""
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))


def child_job(args: argparse.Namespace) -> None:
    """One ``run_job`` on a fresh local Ray; prints its figures as one JSON line."""
    from jobs.arrow_memory import use_jemalloc
    from jobs.config import load_job_config
    from jobs.ray_cluster import init_ray
    from jobs.run import run_job

    t0 = time.perf_counter()
    if os.environ.get(PIN_ENV):  # the whole job (driver, local Ray, its workers: they inherit it) on --cpus cores
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cpus]))
    use_jemalloc()  # as the stylid command does
    config = load_job_config(CONFIG, [f"io.rows_per_shard={args.rows_per_shard}"])
    init_ray(num_cpus=args.cpus, quiet=True)
    with ProcessWatch() as watch:
        t1 = time.perf_counter()
        info = run_job(config, args.output, args.manifest, report=not args.no_report)
        t2 = time.perf_counter()
    r = info["this_run"]
    status = dict(ln.split(":", 1) for ln in open("/proc/self/status").read().splitlines() if ln.startswith("Rss"))
    print(json.dumps({"rss_anon": int(status["RssAnon"].split()[0]) * 1024,
                      "rss_shmem": int(status["RssShmem"].split()[0]) * 1024,
                      "rss_file": int(status["RssFile"].split()[0]) * 1024,
                      **{"processed": r["processed"], "already_done": r["already_done"], "stylize_s": r["seconds"],
                      "job_s": t2 - t1, "wall_s": time.perf_counter() - t0, "driver_peak": watch.driver_peak(),
                      "worker_peak": watch.worker_peak, "worker_peak_shmem": watch.worker_peak_shmem,
                      "cpu_by_role": watch.cpu_by_role, "machine_busy_s": watch.machine_busy_s,
                      "elapsed_s": watch.elapsed_s, "machine_cores": psutil.cpu_count(),
                      "cores_given": len(os.sched_getaffinity(0))}}))  # fmt: skip


def child_plan(args: argparse.Namespace) -> None:
    """The job's plan as ``run_stylize`` makes it (Ray started; the pending rows left to the read tasks it plans)."""
    from jobs.arrow_memory import use_jemalloc
    from jobs.ray_cluster import init_ray
    from pipelines.manifest import iter_manifest
    from pipelines.plan import input_block_rows, plan_pending

    use_jemalloc()
    init_ray(num_cpus=args.cpus, quiet=True)
    before = ProcessWatch.driver_peak()
    t0 = time.perf_counter()  # the plan runs on the driver only: no worker to watch
    done, pending = plan_pending(iter_manifest(args.manifest, None), args.output, {},
                                 block_rows=lambda n: input_block_rows(n, 16, args.cpus))  # fmt: skip
    plan_s = time.perf_counter() - t0
    print(json.dumps({"plan_s": plan_s, "done": len(done), "pending": len(pending), "tasks": len(pending.slices),
                      "driver_peak": ProcessWatch.driver_peak(), "driver_before": before}))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the parent


#: the machine's benchmark lock (shared with other benchmarks): held around each measured child only, so the
#: unmeasured set-up (synthesizing outputs and manifests) does not keep others waiting
LOCK = "/tmp/stylid-bench.lock"


#: seconds to wait for the lock before measuring without it (and saying so): on a shared machine another
#: benchmark may hold it for longer than this one can wait
LOCK_WAIT_S = float(os.environ.get("BENCH_LOCK_WAIT_S", "3600"))


@contextlib.contextmanager
def bench_lock():
    with open(LOCK, "a") as f:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"  (measured WITHOUT {LOCK}: still held by another benchmark after {LOCK_WAIT_S:.0f} s)",
                          flush=True)  # fmt: skip
                    yield
                    return
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_child(mode: str, *extra: str, env: dict | None = None) -> dict:
    with bench_lock():
        return _run_child(mode, *extra, env=env)


def _run_child(mode: str, *extra: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, mode, *extra], cwd=REPO, env={**os.environ, **(env or {})},
                         capture_output=True, text=True, check=False)  # fmt: skip
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{mode} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def job_args(manifest: str, output: str, cpus: int, rows_per_shard: int) -> list[str]:
    return ["--manifest", manifest, "--output", output, "--cpus", str(cpus), "--rows-per-shard", str(rows_per_shard)]


def write_manifest(path: str, n: int, crops: list[str] | None = None, files: int = 1) -> str:
    """``n`` rows (``row<k>`` ids) cycling over ``crops`` (or made-up URIs), in ``files`` Parquet files."""
    os.makedirs(path, exist_ok=True)
    per = -(-n // files)
    for f in range(files):
        ks = np.arange(f * per, min(n, (f + 1) * per))
        ids = pa.array(np.char.add("row", np.char.zfill(ks.astype(str), 8)))
        if crops:
            uris = pa.array(np.asarray(crops, dtype=object)[ks % len(crops)].tolist(), pa.string())
        else:
            uris = pa.array(np.char.add(np.char.add("s3://bucket/faces/", ks.astype(str)), ".png"))
        pq.write_table(pa.table({"image_id": ids, "image_uri": uris}), os.path.join(path, f"part-{f:03d}.parquet"))
    return path


def synthesize_output(output: str, n: int, rows_per_shard: int, faces: bool = True) -> None:
    """A finished output's shards for the ``row<k>`` ids of ``write_manifest``, written by the ``ShardWriter``:
    every metrics column typed as the job's, one face a row."""
    from jobs.config import load_job_config

    config_hash = load_job_config(CONFIG, []).config_hash()
    rng = np.random.default_rng(0)
    face_type = pa.list_(pa.struct([pa.field(k, v) for k, v in FACE_COLUMNS.items()]))
    writer = ShardWriter(output, {}, rows_per_shard)
    for start in range(0, n, rows_per_shard):
        ks = np.arange(start, min(n, start + rows_per_shard))
        m = len(ks)
        ids = np.char.add("row", np.char.zfill(ks.astype(str), 8))
        cols: dict[str, pa.Array] = {}
        for name in METRICS_COLUMNS:
            t = COLUMNS[name]
            if name == "image_id":
                cols[name] = pa.array(ids)
            elif name in ("image_uri", "output_uri"):
                cols[name] = pa.array(np.char.add(np.char.add(f"/data/{name}/", ids), ".png"))
            elif name == "style_uri":
                cols[name] = pa.array(["/data/style.jpg"] * m, pa.string())
            elif name == "status":
                cols[name] = pa.array(["ok"] * m, pa.string())
            elif name == "error":
                cols[name] = pa.nulls(m, pa.string())
            elif name == "config_hash":
                cols[name] = pa.array([config_hash] * m, pa.string())
            elif name in ("engine", "model"):
                cols[name] = pa.array(["identity" if name == "engine" else "none"] * m, pa.string())
            elif pa.types.is_string(t):  # any other text column (``reference_uri``: stylid score's) stays null
                cols[name] = pa.nulls(m, t)
            elif pa.types.is_integer(t):
                cols[name] = pa.array(np.full(m, 32 if name in ("width", "height") else 1), t)
            else:
                cols[name] = pa.array(rng.random(m), t)
        table = pa.table(cols)
        if faces:
            face = pa.StructArray.from_arrays(
                [pa.array(ids) if k == "image_id" else
                 pa.array(["<32"] * m) if k == "size_bucket" else pa.array(["centered"] * m) if k == "backend" else
                 pa.nulls(m, v) if v == pa.string() else  # zoom_strip: null for most faces
                 pa.array(rng.random(m) < 0.5) if v == pa.bool_() else pa.array(np.zeros(m, np.int32)) if
                 v == pa.int32() else pa.array(rng.random(m)) for k, v in FACE_COLUMNS.items()],
                fields=[pa.field(k, v) for k, v in FACE_COLUMNS.items()],
            )  # fmt: skip
            offsets = pa.array(np.arange(m + 1, dtype=np.int32))
            table = table.append_column("face_rows", pa.ListArray.from_arrays(offsets, face).cast(face_type))
        writer.add(table)
    writer.flush()


def output_objects(output: str) -> tuple[int, int, int]:
    """(objects other than images, bytes of metrics/, bytes of faces/) of a local output."""
    count, sizes = 0, {"metrics": 0, "faces": 0}
    for root, _, files in os.walk(output):
        rel = os.path.relpath(root, output).split(os.sep)[0]
        if rel in ("images", "sample_inputs"):
            continue
        count += len(files)
        if rel in sizes:
            sizes[rel] += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return count, sizes["metrics"], sizes["faces"]


def crash_half_way(manifest: str, output: str, n: int, cpus: int, rows_per_shard: int) -> dict:
    """Start the job, SIGKILL it (its process group: the driver and its local Ray) once half the rows are in the
    ledger, then rerun it; the rerun's figures plus the rows the ledger held at the kill."""
    with bench_lock():
        return _crash_half_way(manifest, output, n, cpus, rows_per_shard)


def _crash_half_way(manifest: str, output: str, n: int, cpus: int, rows_per_shard: int) -> dict:
    cmd = [sys.executable, __file__, "_job", *job_args(manifest, output, cpus, rows_per_shard), "--no-report"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = os.path.join(output, "metrics")
    while proc.poll() is None:
        shards = len([f for f in os.listdir(metrics) if f.endswith(".parquet")]) if os.path.isdir(metrics) else 0
        if shards * rows_per_shard >= n // 2:
            break
        time.sleep(0.1)
    if proc.poll() is not None:
        raise RuntimeError("the run ended before half its rows were in: nothing to kill")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = len(done_ids(output, {}))
    resumed = _run_child("_job", *job_args(manifest, output, cpus, rows_per_shard), "--no-report")
    final = done_ids(output, {})
    assert len(final) == n and len(set(final.to_pylist())) == n, "resume lost or doubled rows"
    return {"at_kill": at_kill, **resumed}


def mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def cores_line(figures: dict) -> str:
    """Where a run's cores went: CPU seconds per row by process role, the biggest first (ms/row), and how busy
    the machine was (all its processes) against its cores."""
    rows = max(1, figures["processed"])
    roles = sorted(figures["cpu_by_role"].items(), key=lambda kv: -kv[1])
    spent = sum(v for _, v in roles)
    shown = ", ".join(f"{k} {1000 * v / rows:.2f}" for k, v in roles if v >= 0.01 * spent)
    capacity = figures["machine_cores"] * figures["elapsed_s"]
    given = figures["cores_given"]
    job, share = 1000 * spent / rows, 100 * spent / (given * figures["elapsed_s"])
    return (
        f"cores (CPU ms/row): {shown}; this job {job:.2f} in all, {share:.0f}%"
        f" of the {given} cores it could run on (so at most {1000 * given / job:.0f} rows/s on them); the machine"
        f" {100 * figures['machine_busy_s'] / capacity:.0f}% busy over {figures['machine_cores']} cores"
    )


def cmd_pipeline(args: argparse.Namespace) -> None:
    from stylid_core.sample_data import write_face_crops

    work = tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir)
    try:
        crops = write_face_crops(os.path.join(work, "crops"), CROPS)
        print(f"{'rows':>8} {'cpus':>4} {'rows/s':>7} {'ms/row/core':>11} {'objects':>7} {'metrics':>9}"
              f" {'faces':>9} {'driver MB':>9} {'worker MB':>9} {'rerun s':>7} {'(wall)':>6} {'resume s':>8}"
              f" {'redone':>7}")  # fmt: skip
        print(
            f"  (ms/row/core: the whole job's cost, model work and Ray included; its split into model work and the"
            f" pipeline's own is the stages mode's; loadavg at start {loadavg()})",
            flush=True,
        )
        for n in args.rows:
            manifest = write_manifest(os.path.join(work, f"manifest{n}"), n, crops)
            output = os.path.join(work, f"out{n}-{args.cpus}")
            pin = {PIN_ENV: "1"} if args.pin else None
            first = run_child("_job", *job_args(manifest, output, args.cpus, args.rows_per_shard), env=pin)
            objects, mbytes, fbytes = output_objects(output)
            rerun = run_child("_job", *job_args(manifest, output, args.cpus, args.rows_per_shard))
            assert rerun["processed"] == 0 and rerun["already_done"] == n
            resume = {"job_s": float("nan"), "processed": 0}
            if args.crash:
                resume = crash_half_way(manifest, output + "-crash", n, args.cpus, args.rows_per_shard)
                shutil.rmtree(output + "-crash")
            rate = first["processed"] / first["stylize_s"]
            print(f"{n:>8} {args.cpus:>4} {rate:>7.0f} {1000 * args.cpus / rate:>11.2f} {objects:>7}"
                  f" {mbytes / 1e6:>7.1f}MB {fbytes / 1e6:>7.1f}MB {mb(first['driver_peak']):>9}"
                  f" {mb(first['worker_peak']):>9} {rerun['job_s']:>7.1f} {rerun['wall_s']:>6.1f}"
                  f" {resume['job_s']:>8.1f} {resume['processed']:>7}  loadavg {loadavg()}", flush=True)  # fmt: skip
            print(
                f"         driver at the end: {mb(first['rss_anon'])} MB anonymous, {mb(first['rss_shmem'])} MB"
                f" shared memory (Ray's object store pages it read), {mb(first['rss_file'])} MB files; the worker"
                f" at its peak: {mb(first['worker_peak_shmem'])} MB of it object store pages",
                flush=True,
            )
            print(f"         {cores_line(first)}", flush=True)
            if args.crash:
                print(
                    f"         crash: killed with {resume['at_kill']} rows in the ledger; the resume redid"
                    f" {resume['processed']} rows (driver {mb(resume['driver_peak'])} MB)",
                    flush=True,
                )
            shutil.rmtree(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_ledger(args: argparse.Namespace) -> None:
    work = tempfile.mkdtemp(prefix="bench-ledger-", dir=args.workdir)
    try:
        n = args.rows
        t0 = time.perf_counter()
        output = os.path.join(work, "out")
        synthesize_output(output, n, args.rows_per_shard)
        manifest = write_manifest(os.path.join(work, "manifest"), n, [f"/data/image_uri/row{k}.png" for k in
                                                                       range(CROPS)])  # fmt: skip
        objects, mbytes, fbytes = output_objects(output)
        print(
            f"synthesized a finished output of {n} rows in {time.perf_counter() - t0:.0f} s: {objects} objects"
            f" ({mbytes / 1e6:.0f} MB metrics, {fbytes / 1e6:.0f} MB faces)",
            flush=True,
        )
        for rps in sorted({args.rows_per_shard}):
            local = run_child("_job", *job_args(manifest, output, 2, rps))
            assert local["processed"] == 0 and local["already_done"] == n
            print(
                f"local disk: rerun finds nothing to do in {local['stylize_s']:.1f} s (ledger + plan); the whole"
                f" job (+ summary scan, report) {local['job_s']:.1f} s, {local['wall_s']:.1f} s with Ray's start;"
                f" driver peak {mb(local['driver_peak'])} MB",
                flush=True,
            )
        if args.s3:
            s3_rerun(work, output, manifest, n)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def s3_rerun(work: str, output: str, manifest: str, n: int) -> None:
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}  # fmt: skip
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"])
        fs.mkdir("bench")
        t0 = time.perf_counter()
        for sub in ("metrics", "faces"):
            fs.put(os.path.join(output, sub) + "/", f"bench/out/{sub}/", recursive=True)
        fs.put(manifest + "/", "bench/manifest/", recursive=True)
        print(f"uploaded to moto S3 in {time.perf_counter() - t0:.0f} s", flush=True)
        r = run_child("_job", *job_args("s3://bench/manifest", "s3://bench/out", 2, DEFAULT_ROWS_PER_SHARD), env=env)
        assert r["processed"] == 0 and r["already_done"] == n
        print(
            f"moto S3 on 127.0.0.1: rerun finds nothing to do in {r['stylize_s']:.1f} s (ledger + plan); the whole"
            f" job (+ summary scan, report) {r['job_s']:.1f} s, {r['wall_s']:.1f} s with Ray's start;"
            f" driver peak {mb(r['driver_peak'])} MB",
            flush=True,
        )
    finally:
        server.stop()


class ModelClock:
    """Seconds spent inside wrapped callables (the model work of ``cmd_stages``), summed per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed


def cmd_stages(args: argparse.Namespace) -> None:
    with bench_lock():
        _cmd_stages(args)


def _cmd_stages(args: argparse.Namespace) -> None:
    import pipelines.stages as stages
    from jobs.config import load_job_config
    from pipelines.stylize import stylize_chain
    from stylid_core.sample_data import write_face_crops

    work = tempfile.mkdtemp(prefix="bench-stages-", dir=args.workdir)
    try:
        crops = write_face_crops(os.path.join(work, "crops"), CROPS)
        config = load_job_config(CONFIG, [])
        n, batch = args.rows, config.resources.fused.batch_size
        manifest = pa.table({"image_id": [f"row{k:08d}" for k in range(n + batch)],
                             "image_uri": [crops[k % len(crops)] for k in range(n + batch)]})  # fmt: skip
        rows = stages.prepare_manifest(manifest, None)
        specs = stylize_chain(config, os.path.join(work, "out"), key_suffix="")
        fused = stages.FusedCPUStage([(s.cls, s.kwargs) for s in specs])
        fused(rows.slice(0, batch).to_pandas())  # warm-up: first calls, style cache
        clock = ModelClock()
        for stage in fused.stages:
            for attr in ("analyzer", "stylizer"):
                obj = getattr(stage, attr, None)
                if obj is not None:
                    for method in ("detect", "embed", "stylize_batch"):
                        if hasattr(obj, method):
                            setattr(obj, method, clock.wrap(f"{attr}.{method}", getattr(obj, method)))
        for name in ("colour_distance", "content_similarity"):
            setattr(stages, name, clock.wrap(name, getattr(stages, name)))
        batches = [rows.slice(k, batch).to_pandas() for k in range(batch, n + batch, batch)]
        t0 = time.perf_counter()
        done = 0
        for b in batches:
            out = fused(b)
            done += sum(s == "ok" for s in out.column("status").to_pylist())
        total = time.perf_counter() - t0
        assert done == n, f"{n - done} rows failed"
        model = sum(clock.seconds.values())
        print(f"fused actor, {n} rows of 32 px in batches of {batch}, one core, loadavg {loadavg()}")
        print(f"  whole cost:      {1000 * total / n:.3f} ms per row per core ({n / total:.0f} rows/s)")
        print(
            f"  model work:      {1000 * model / n:.3f} ms per row ("
            + ", ".join(f"{k} {1000 * v / n:.3f}" for k, v in sorted(clock.seconds.items()))
            + ")"
        )
        print(
            f"  pipeline's own:  {1000 * (total - model) / n:.3f} ms per row per core   <- the target (<= 1 ms)",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cmd_plan(args: argparse.Namespace) -> None:
    work = tempfile.mkdtemp(prefix="bench-plan-", dir=args.workdir)
    try:
        t0 = time.perf_counter()
        manifest = write_manifest(os.path.join(work, "manifest"), args.manifest_rows, files=10)
        output = os.path.join(work, "out")
        synthesize_output(output, args.done_rows, DEFAULT_ROWS_PER_SHARD, faces=False)
        print(
            f"synthesized a {args.manifest_rows}-row manifest (10 files) and a {args.done_rows}-row ledger in"
            f" {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        r = run_child("_plan", "--manifest", manifest, "--output", output, "--cpus", str(args.cpus))
        assert r["done"] == args.done_rows and r["pending"] == args.manifest_rows - args.done_rows
        print(
            f"plan of {args.manifest_rows} rows against a {args.done_rows}-row ledger: {r['plan_s']:.1f} s,"
            f" driver peak RSS {mb(r['driver_peak'])} MB ({mb(r['driver_before'])} MB with Ray started, before"
            f" the plan); {r['pending']} rows pending, left to"
            f" {r['tasks']} read tasks (load {loadavg()})",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("pipeline")
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--crash", action="store_true")
    p.add_argument("--pin", action="store_true",
                   help="each size's first run (driver, Ray, workers) on --cpus of the machine's cores")  # fmt: skip
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    p.add_argument("--workdir", default=None)
    p = sub.add_parser("ledger")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    p.add_argument("--s3", action="store_true")
    p.add_argument("--workdir", default=None)
    p = sub.add_parser("stages")
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--workdir", default=None)
    p = sub.add_parser("plan")
    p.add_argument("--manifest-rows", type=int, default=10_000_000)
    p.add_argument("--done-rows", type=int, default=5_000_000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--workdir", default=None)
    for name in ("_job", "_plan"):
        p = sub.add_parser(name)
        p.add_argument("--manifest", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--cpus", type=int, default=2)
        p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
        p.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    modes = {"pipeline": cmd_pipeline, "ledger": cmd_ledger, "plan": cmd_plan, "stages": cmd_stages,
             "_job": child_job, "_plan": child_plan}  # fmt: skip
    modes[args.mode](args)


if __name__ == "__main__":
    main()

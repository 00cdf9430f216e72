"""Images/s of the stylize stage through Ray Data, and how busy the GPU is while it runs.

Only the stylize stage runs: ``--rows`` prepared rows (random content pixels at ``--size`` px, one face box each, the
bundled style) enter as Arrow blocks and go through ``map_batches(StylizeStage, num_gpus=..., compute=
ActorPoolStrategy(...))`` exactly as ``pipelines.chain.build_chain`` maps an actor stage, with the stage options and
``resources.stylize`` of ``--config`` (default ``configs/stylize_tiny.yaml``) plus ``--set`` overrides. The rows are
made on the driver beforehand, so no load, face or score work competes with the stage.

While the stage runs, a thread samples the GPU's utilisation (the share of the last sample period in which a kernel
was running) every ``--sample-ms`` through NVML (``nvidia-ml-py``), else ``nvidia-smi``; without either (a CPU
machine) the busy share is reported as unavailable, never guessed. Figures:

- ``images_per_s``: rows / wall time from the first request to the last row (actor start and model build
  included); ``images_per_s_working``: rows / the working window, from the start of the first ``StylizeStage``
  batch to the end of the last (each batch is stamped with its wall-clock start and end inside the actor, so the
  window does not depend on when Ray hands the results to the driver);
- ``gpu_busy_share`` / ``gpu_busy_share_working``: the mean sampled utilisation over the same two windows;
- ``stage_busy_share_working``: seconds the actors spent inside ``StylizeStage`` batches per second of the working
  window and actor (1.0 = never idle): where it is high and the GPU's share low, the engine waits on the CPU.

    python benchmarks/bench_stylize_stage.py --rows 16 --size 64                       # CPU, tiny model
    python benchmarks/bench_stylize_stage.py --rows 512 --set resources.stylize.num_gpus=1 \\
        --set stylize.options.device=cuda                                               # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.stages import StylizeStage  # noqa: E402


class TimedStylizeStage(StylizeStage):
    """``StylizeStage`` that stamps each batch's rows with the batch's wall-clock start and end (epoch seconds)."""

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        start = time.time()
        table = super().__call__(df)
        end = time.time()
        n = table.num_rows
        table = table.append_column("batch_start", pa.array([start] * n, pa.float64()))
        return table.append_column("batch_end", pa.array([end] * n, pa.float64()))


class GpuBusySampler:
    """Samples GPU 0's utilisation (percent of time a kernel ran) in a thread: NVML, else ``nvidia-smi``.

    ``source`` says which one answered, or why none did; ``samples`` are (epoch seconds, percent).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.memory_used_mib: float | None = None
        self._stop = threading.Event()
        self._read = self._open()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self):
        reasons = []
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = f"nvml ({pynvml.nvmlDeviceGetName(handle)})"

            def read() -> tuple[float, float]:
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), mem

            read()
            return read
        except Exception as exc:  # no library, no driver or no device
            reasons.append(f"nvml: {type(exc).__name__}: {exc}")
        if shutil.which("nvidia-smi"):
            fields = "--query-gpu=utilization.gpu,memory.used"
            query = ["nvidia-smi", fields, "--format=csv,noheader,nounits", "-i", "0"]

            def read_smi() -> tuple[float, float]:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5, check=True).stdout
                util, mem = (float(v) for v in out.strip().splitlines()[0].split(","))
                return util, mem

            try:
                read_smi()
                self.source = "nvidia-smi"
                return read_smi
            except Exception as exc:
                reasons.append(f"nvidia-smi: {type(exc).__name__}: {exc}")
        else:
            reasons.append("nvidia-smi: not on PATH")
        self.source = "unavailable (" + "; ".join(reasons) + ")"
        return None

    @property
    def available(self) -> bool:
        return self._read is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            util, mem = self._read()
            self.samples.append((time.time(), util))
            self.memory_used_mib = max(self.memory_used_mib or 0.0, mem)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuBusySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def mean_share(self, start: float, end: float) -> float | None:
        """Mean sampled utilisation in [start, end] as a share (0..1); None without samples there."""
        values = [u for t, u in self.samples if start <= t <= end]
        return float(np.mean(values)) / 100.0 if values else None


def make_rows(n: int, size: int, style_uri: str) -> pd.DataFrame:
    """``n`` rows as the face stage leaves them: RGB pixels (smooth random colours plus noise), one face box each
    (a third of the image, centred), status ``ok``."""
    from stylid_core.faces.base import Face

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    side = size / 3
    x0 = y0 = (size - side) / 2
    box = (x0, y0, x0 + side, y0 + side)
    kps = np.array(
        [[x0 + side * u, y0 + side * v] for u, v in ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))],
        np.float32,
    )
    face = json.dumps([Face(box=box, keypoints=kps, score=1.0).to_dict()])
    rows = []
    for k in range(n):
        base = np.stack([xx, yy, 1 - xx * yy], axis=2) * rng.uniform(80, 255, 3)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        rows.append({"image_id": f"bench-{k:05d}", "image_uri": f"memory://bench-{k:05d}", "style_uri": style_uri,
                     "status": "ok", "error": None, "width": size, "height": size, "pixels": pixels.tobytes(),
                     "n_faces": 1, "n_faces_detected": 1, "faces_json": face})  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stylize_tiny.yaml", help="job config whose stylize stage runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="content image px (square)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--sample-ms", type=float, default=50.0, help="GPU utilisation sampling interval")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)

    import ray
    import torch
    from ray.data import ActorPoolStrategy

    from jobs.config import load_job_config
    from jobs.ray_cluster import init_ray
    from pipelines.resources import stage_remote_args
    from pipelines.schema import to_table
    from stylid_core.sample_data import default_style_path

    config = load_job_config(args.config, args.overrides)
    res = config.resources.stylize
    rows = make_rows(args.rows, args.size, config.stylize.style_uri or default_style_path())
    init_ray(num_cpus=args.num_cpus, quiet=True)
    cluster = ray.cluster_resources()
    if res.num_gpus > cluster.get("GPU", 0.0):
        raise SystemExit(f"resources.stylize.num_gpus={res.num_gpus:g} but the local Ray has {cluster.get('GPU', 0)}")
    pool = res.pool_size or 1
    blocks = [to_table(rows.iloc[k : k + res.batch_size]) for k in range(0, len(rows), res.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        TimedStylizeStage,
        fn_constructor_kwargs={"stylize": config.stylize, "score": config.score, "io": config.io},
        batch_format="pandas",
        batch_size=res.batch_size,
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        compute=ActorPoolStrategy(size=pool),
        **stage_remote_args(),
    )
    statuses: dict[str, int] = {}
    spans: set[tuple[float, float]] = set()  # (start, end) of every StylizeStage batch
    engine = model = None
    with GpuBusySampler(args.sample_ms / 1000.0) as sampler:
        t_start = time.time()
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            for status, count in batch["status"].value_counts().items():
                statuses[status] = statuses.get(status, 0) + int(count)
            spans.update(zip(batch["batch_start"].astype(float), batch["batch_end"].astype(float)))
            engine = engine or (batch["engine"].iloc[0] if len(batch) else None)
            model = model or (batch["model"].iloc[0] if len(batch) else None)
        t_end = time.time()
    ray.shutdown()
    t_work = min((a for a, _ in spans), default=t_end)
    t_work_end = max((b for _, b in spans), default=t_end)
    working_s = t_work_end - t_work
    stage_s = sum(b - a for a, b in spans)
    options = config.stylize.options
    report = {
        "device_name": torch.cuda.get_device_name(0) if res.num_gpus and torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "config": args.config,
        "overrides": args.overrides,
        "engine": engine,
        "model": model,
        "device_option": options.get("device", "auto"),
        "dtype": options.get("dtype", "auto (float16 on CUDA, float32 on CPU)"),
        "resolution": options.get("resolution"),
        "steps": options.get("steps"),
        "batch_size": res.batch_size,
        "num_gpus": res.num_gpus,
        "num_cpus": res.num_cpus,
        "actors": pool,
        "rows": args.rows,
        "size_px": args.size,
        "statuses": statuses,
        "seconds": t_end - t_start,
        "seconds_to_first_batch_start": t_work - t_start,
        "seconds_working": working_s,
        "batches": len(spans),
        "images_per_s": args.rows / (t_end - t_start),
        "images_per_s_working": args.rows / working_s if working_s > 0 else None,
        "stage_seconds": stage_s,
        "stage_busy_share_working": stage_s / (working_s * pool) if working_s > 0 else None,
        "gpu_busy_source": sampler.source,
        "gpu_busy_share": sampler.mean_share(t_start, t_end) if sampler.available else None,
        "gpu_busy_share_working": sampler.mean_share(t_work, t_work_end) if sampler.available else None,
        "gpu_samples": len(sampler.samples),
        "gpu_memory_used_mib_peak": sampler.memory_used_mib,
        "target_gpu_busy_share": 0.9,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()

"""The stylization dataset: manifest -> prepare -> load -> faces -> stylize -> score -> write.

``run_stylize`` validates the manifest on the driver (reading only its id and URI columns), subtracts the rows
already in the output (the resume ledger is the set of ``metrics/`` shards), and streams the rest through the
stages. A run with nothing left to do starts no stage and loads no model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data
from ray.data import ActorPoolStrategy

from pipelines.schema import to_table
from pipelines.stages import FaceStage, FusedCPUStage, LoadStage, ScoreStage, StylizeStage, WriteStage, prepare_rows
from stylid_core.config import ConfigError, JobConfig, StageResources
from stylid_core.storage import delete, filesystem, join, list_files, read_parquet_dir, with_retries

log = logging.getLogger(__name__)


def arrow_filesystem(uri: str, storage_options: dict | None = None) -> tuple[pa.fs.FileSystem | None, str]:
    """A pyarrow filesystem (over fsspec) and path for ``uri``; ``None`` for local paths (pyarrow's own)."""
    fs, path = filesystem(uri, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None, path
    return pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs)), path


def read_manifest(
    manifest_uri: str, default_style_uri: str | None, storage_options: dict | None = None
) -> pd.DataFrame:
    """The manifest's rows with ``image_id`` (derived where absent), ``image_uri``, the effective ``style_uri``,
    ``status`` and ``error``. Raises ``ValueError`` for a missing manifest, no ``image_uri`` column or duplicate ids.

    The manifest is read on the driver (three string columns: about 200 bytes a row, 200 MB for a million rows);
    images are read by the load stage, in the stream.
    """
    raw = read_manifest_columns(manifest_uri, "image_uri", ("image_id", "style_uri"), storage_options)
    df = prepare_rows(raw, default_style_uri)
    check_unique_ids(
        df, manifest_uri, "rows without one get a hash of image_uri, so a URI listed twice is a duplicate too"
    )
    return df


def read_manifest_columns(
    manifest_uri: str, required: str, optional: tuple[str, ...], storage_options: dict | None = None
) -> pd.DataFrame:
    """The ``required`` column and whichever ``optional`` ones exist of a Parquet manifest (file or prefix), read
    on the driver; ``ValueError`` for an unreadable manifest or a missing ``required`` column."""
    afs, path = arrow_filesystem(manifest_uri, storage_options)
    try:
        dataset = with_retries(lambda: pads.dataset(path, filesystem=afs, format="parquet"), f"read {manifest_uri}")
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"cannot read manifest {manifest_uri}: {exc}") from None
    names = set(dataset.schema.names)
    if required not in names:
        raise ValueError(f"manifest {manifest_uri} has no '{required}' column (columns: {sorted(names)})")
    columns = [c for c in (*optional, required) if c in names]
    try:
        return with_retries(lambda: dataset.to_table(columns=columns), f"read {manifest_uri}").to_pandas()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"cannot read manifest {manifest_uri}: {exc}") from None


def check_unique_ids(df: pd.DataFrame, manifest_uri: str, hint: str) -> None:
    """``ValueError`` naming a few duplicates when ``df``'s ``image_id`` is not unique."""
    dupes = df["image_id"][df["image_id"].duplicated()].unique()
    if len(dupes):
        raise ValueError(
            f"manifest {manifest_uri} has {len(dupes)} duplicate image_id(s), e.g. {list(dupes[:5])}; image_id must be"
            f" unique ({hint})"
        )


def _pool(res: StageResources, total_cpus: float, total_gpus: float) -> ActorPoolStrategy:
    if res.pool_size:
        return ActorPoolStrategy(size=res.pool_size)
    if res.num_gpus > 0:
        limit = total_gpus / res.num_gpus
    else:
        limit = total_cpus / max(res.num_cpus, 0.01)
    return ActorPoolStrategy(min_size=1, max_size=max(1, int(limit)))


def check_pools_fit(
    pools: dict[str, StageResources], tasks: dict[str, float], cpus: float, gpus: float, memory: float | None = None
) -> None:
    """Every actor pool's first actors (``pool_size``, at least one) must fit at once beside one task of each
    stateless step (``tasks``: name -> CPUs); otherwise Ray Data waits forever for the pool that cannot start.
    Raise ``ConfigError`` with the numbers instead. ``memory``: the cluster's memory resource in bytes, checked
    against the pools' declared ``memory_mb`` when given."""
    need_cpu = sum(r.num_cpus * max(1, r.pool_size) for r in pools.values()) + sum(tasks.values())
    need_gpu = sum(r.num_gpus * max(1, r.pool_size) for r in pools.values())
    need_mem = sum(r.memory_mb * max(1, r.pool_size) for r in pools.values()) * 2**20
    if memory is not None and need_mem > memory:
        detail = ", ".join(
            f"{k}: {r.memory_mb:g} MiB x {max(1, r.pool_size)}" for k, r in pools.items() if r.memory_mb
        )
        raise ConfigError(
            f"the stages declare {need_mem / 2**30:.2f} GiB of memory to run at once ({detail}) but the Ray cluster"
            f" has {memory / 2**30:.2f} GiB; lower resources.<stage>.memory_mb or pool_size, or lower"
            " io.max_work_pixels with them"
        )
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        gpu = lambda r: f" + {r.num_gpus:g} GPU" if r.num_gpus else ""  # noqa: E731
        detail = ", ".join(
            [f"{k}: {r.num_cpus:g} CPU{gpu(r)} x {max(1, r.pool_size)}" for k, r in pools.items()]
            + [f"{k} {c:g}" for k, c in tasks.items()]
        )
        raise ConfigError(
            f"the stages need {need_cpu:g} CPU(s) and {need_gpu:g} GPU(s) to run at once ({detail}) but the Ray"
            f" cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s); lower resources.<stage>.num_cpus / num_gpus /"
            " pool_size"
        )


def _check_fits(config: JobConfig, cpus: float, gpus: float, memory: float | None = None) -> None:
    res = config.resources
    pools = {"fused": res.fused} if fused(config) else {"faces": res.faces, "stylize": res.stylize, "score": res.score}
    tasks = {} if fused_io(config) else {"load": res.load.num_cpus, "write": res.write.num_cpus}
    check_pools_fit(pools, tasks, cpus, gpus, memory)


#: driver environment variables that every stage needs too (object-store credentials, offline model loading)
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HOME")  # fmt: skip


def stage_remote_args() -> dict:
    """``runtime_env`` carrying the driver's ``FORWARDED_ENV`` to the stages' workers.

    Workers of a local Ray inherit the environment Ray was started with, not later changes; cluster workers have
    their own. Forwarding makes ``AWS_*`` set for the job reach every stage either way.
    """
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def fused(config: JobConfig) -> bool:
    """Whether faces, stylize and score run as one CPU actor pool (``resources.fuse_cpu_stages``, no GPU asked)."""
    res = config.resources
    return res.fuse_cpu_stages and not any(r.num_gpus > 0 for r in (res.faces, res.stylize, res.score))


def fused_io(config: JobConfig) -> bool:
    """Whether the fused pool also loads and writes (``resources.fuse_io``): the whole job is then one operator."""
    return fused(config) and config.resources.fuse_io


def fused_pool_size(config: JobConfig, cpus: float, memory: float | None = None) -> int:
    """Actors of the fused pool: ``pool_size``, else as many as the CPUs left beside load and write tasks allow,
    at most one per CPU (each actor is single-threaded CPU work; more would only hold more models in memory), and
    no more than the cluster's ``memory`` (bytes) holds at the declared ``memory_mb`` each."""
    res = config.resources
    if res.fused.pool_size:
        return res.fused.pool_size
    spare = cpus if fused_io(config) else cpus - res.load.num_cpus - res.write.num_cpus
    size = min(int(spare / res.fused.num_cpus + 1e-9), int(cpus + 1e-9))
    if memory is not None and res.fused.memory_mb > 0:
        size = min(size, int(memory / (res.fused.memory_mb * 2**20)))
    return max(1, size)


def _load(df, io):
    return LoadStage(io)(df)


def _write(df, **kwargs):
    return WriteStage(**kwargs)(df)


def build_dataset(config: JobConfig, rows: pd.DataFrame, output_uri: str) -> ray.data.Dataset:
    """The lazy Ray dataset of the whole stylization job (nothing runs until it is consumed).

    ``rows`` are prepared manifest rows (``read_manifest``). Stages with models (faces, stylize, score) run as
    actor pools, so models load once per actor; stateless steps (load, write) as tasks. A CPU-only config runs
    the three model stages in one pool (``fuse_cpu_stages``), and by default load and write inside it too
    (``fuse_io``), which makes the whole job one operator. Rows enter in small blocks (an actor takes a whole
    block), so every actor has work as soon as the first rows are in and until the last.
    """
    io, res = config.io, config.resources
    resources = ray.cluster_resources()
    cpus, gpus, memory = resources.get("CPU", 1.0), resources.get("GPU", 0.0), resources.get("memory")
    _check_fits(config, cpus, gpus, memory)
    remote = stage_remote_args()
    key_suffix = "" if config.is_default() else f"-{config.config_hash()}"
    # an actor takes a whole block: blocks as small as the model stages' batches keep every actor busy to the end,
    # and a job of fewer rows than the actors' batches hold is split so that each CPU still gets some
    first_batch = res.fused.batch_size if fused(config) else res.faces.batch_size
    per_cpu = -(-len(rows) // max(1, int(cpus)))
    block_rows = max(min(first_batch, per_cpu), -(-len(rows) // 20_000), 1)
    blocks = [to_table(rows.iloc[k : k + block_rows]) for k in range(0, len(rows), block_rows)]
    ds = ray.data.from_arrow(blocks)
    write_args = {"output_uri": output_uri, "config_hash": config.config_hash(), "key_suffix": key_suffix}
    # fuse_io: the fused actors load and write too, so the job is one operator: no pixels through the object store,
    # no per-task dispatch of load and write (measured on 2 cores: about 2% more images/s than separate tasks)
    io_inside = fused_io(config)
    if not io_inside:
        ds = ds.map_batches(
            _load,
            fn_kwargs={"io": io},
            batch_format="pandas",
            batch_size=res.load.batch_size,
            num_cpus=res.load.num_cpus,
            concurrency=res.load.pool_size or None,
            **res.load.ray_memory(),
            **remote,
        )
    if fused(config):
        ds = ds.map_batches(
            FusedCPUStage,
            fn_constructor_kwargs={"faces": config.faces, "stylize": config.stylize, "score": config.score, "io": io,
                                   "write": write_args if io_inside else None},
            batch_format="pandas", batch_size=res.fused.batch_size, num_cpus=res.fused.num_cpus,
            # one pool holds the whole CPU budget: start every actor at once (Ray's autoscaler adds actors only
            # once work queues up, which a steady stream of small blocks rarely shows)
            compute=ActorPoolStrategy(size=fused_pool_size(config, cpus, memory)),
            **res.fused.ray_memory(), **remote,
        )  # fmt: skip
        if io_inside:
            return ds
    else:
        ds = ds.map_batches(
            FaceStage, fn_constructor_kwargs={"faces": config.faces}, batch_format="pandas",
            batch_size=res.faces.batch_size, num_cpus=res.faces.num_cpus, compute=_pool(res.faces, cpus, gpus),
            **res.faces.ray_memory(), **remote,
        )  # fmt: skip
        ds = ds.map_batches(
            StylizeStage,
            fn_constructor_kwargs={"stylize": config.stylize, "score": config.score, "io": io},
            batch_format="pandas",
            batch_size=res.stylize.batch_size,
            num_cpus=res.stylize.num_cpus,
            num_gpus=res.stylize.num_gpus or None,
            compute=_pool(res.stylize, cpus, gpus),
            **res.stylize.ray_memory(),
            **remote,
        )
        ds = ds.map_batches(
            ScoreStage,
            fn_constructor_kwargs={"faces": config.faces, "score": config.score, "io": io},
            batch_format="pandas",
            batch_size=res.score.batch_size,
            num_cpus=res.score.num_cpus,
            num_gpus=res.score.num_gpus or None,
            compute=_pool(res.score, cpus, gpus),
            **res.score.ray_memory(),
            **remote,
        )
    ds = ds.map_batches(
        _write,
        fn_kwargs={**write_args, "io": io},
        batch_format="pandas", batch_size=res.write.batch_size, num_cpus=res.write.num_cpus,
        concurrency=res.write.pool_size or None, **res.write.ray_memory(), **remote,
    )  # fmt: skip
    return ds


@dataclass
class RunResult:
    """What one ``run_stylize`` call did."""

    total_rows: int
    already_done: int
    processed: int
    seconds: float
    status_counts: dict[str, int] = field(default_factory=dict)  # of the rows processed by this call

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_second": self.images_per_second}


def done_ids(output_uri: str, storage_options: dict, ids) -> set[str]:
    """The ids among ``ids`` already in the output's resume ledger (its ``metrics/`` shards)."""
    done = read_parquet_dir(join(output_uri, "metrics"), storage_options, columns=["image_id"])["image_id"]
    return set(done) & set(ids)


def drop_orphan_face_shards(output_uri: str, storage_options: dict) -> None:
    """Delete ``faces/part-<h>`` shards whose ``metrics/part-<h>`` is missing: a batch that crashed between the two
    writes. Its rows are redone, possibly batched differently (another shard name), which would duplicate them."""
    done = {posixpath.basename(u) for u in list_files(join(output_uri, "metrics"), ".parquet", storage_options)}
    for uri in list_files(join(output_uri, "faces"), ".parquet", storage_options):
        if posixpath.basename(uri) not in done:
            log.info("removing %s: its batch has no metrics shard and is redone", uri)
            delete(uri, storage_options)


def process_pending(
    manifest: pd.DataFrame, output_uri: str, storage_options: dict, build: Callable[[pd.DataFrame], ray.data.Dataset]
) -> tuple[set[str], Counter[str]]:
    """Run the rows of ``manifest`` not yet in ``output_uri``'s ``metrics/`` ledger through ``build(rows)``'s
    dataset; returns the ids already done and the status counts of the rows processed now. With nothing pending
    no dataset is built, so no stage starts and no model loads."""
    done = done_ids(output_uri, storage_options, manifest["image_id"])
    pending = manifest[~manifest["image_id"].isin(done)]
    log.info("manifest: %d rows, %d already in the output, %d to process", len(manifest), len(done), len(pending))
    counts: Counter[str] = Counter()
    if len(pending):
        drop_orphan_face_shards(output_uri, storage_options)
        for batch in build(pending.reset_index(drop=True)).iter_batches(batch_format="pandas", batch_size=None):
            counts.update(batch["status"].tolist())
    return done, counts


def run_stylize(config: JobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Stylize and score every manifest row not yet in ``output_uri``; Ray must be initialised."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = read_manifest(manifest_uri, config.stylize.style_uri, opts)
    done, counts = process_pending(manifest, output_uri, opts, lambda rows: build_dataset(config, rows, output_uri))
    return RunResult(
        total_rows=len(manifest),
        already_done=len(done),
        processed=sum(counts.values()),
        seconds=time.perf_counter() - t0,
        status_counts=dict(counts),
    )

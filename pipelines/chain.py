"""The chain builder: a job's stages, lazily chained on its pending rows into one Ray dataset."""

from __future__ import annotations

import ray
import ray.data
from ray.data import ActorPoolStrategy

from pipelines.credentials import StageCredentials, with_credentials
from pipelines.plan import PendingRows
from pipelines.resources import (
    _check_fits,
    _pool,
    fused,
    fused_io,
    fused_pool_size,
    stage_remote_args,
)
from pipelines.shard_writers import ShardWriters
from pipelines.stages import (
    SOURCE_IMAGE,
    FaceStage,
    FusedCPUStage,
    ImageColumn,
    LoadStage,
    ScoreStage,
    StylizeStage,
    WriteStage,
)
from stylid_core.config import JobConfig


def _load(df, io, images=SOURCE_IMAGE, credentials: StageCredentials | None = None):
    if credentials:
        credentials.export()
    return LoadStage(io, images)(df)


def _write(df, credentials: StageCredentials | None = None, **kwargs):
    if credentials:
        credentials.export()
    return WriteStage(**kwargs)(df)


def build_dataset(
    config: JobConfig,
    rows: PendingRows,
    output_uri: str,
    *,
    stylize: bool = True,
    images: tuple[ImageColumn, ...] = SOURCE_IMAGE,
    write_images: bool = True,
    shard_writers: ShardWriters | None = None,
) -> ray.data.Dataset:
    """The lazy Ray dataset of the whole stylization job (nothing runs until it is consumed).

    ``rows`` are a plan's pending rows, read as the dataset runs (``PendingRows``). Stages with models (faces,
    stylize, score) run as actor pools, so models load once per actor; stateless steps (load, write) as tasks. A
    CPU-only config runs the three model stages in one pool (``fuse_cpu_stages``), and by default load and write
    inside it too (``fuse_io``), which makes the whole job one operator. Rows enter in small blocks (an actor takes
    a whole block), so every actor has work as soon as the first rows are in and until the last.

    The write stage hands the metrics and face rows to ``shard_writers`` (``pipelines.shard_writers``), and the
    dataset holds their statuses; without writers it holds the rows themselves.

    ``stylid score`` builds the same chain without the stylize stage (``stylize=False``), loading the output and
    reference images too (``images``) and writing only the shards (``write_images=False``). ``config`` is then a
    ``ScoreJobConfig``: anything with ``faces``, ``score``, ``io``, ``resources`` and ``config_hash()``.
    """
    io, res = config.io, config.resources
    resources = ray.cluster_resources()
    cpus, gpus, memory = resources.get("CPU", 1.0), resources.get("GPU", 0.0), resources.get("memory")
    _check_fits(config, cpus, gpus, stylize, memory)
    remote = stage_remote_args()
    credentials = StageCredentials.from_environ()
    key_suffix = "" if not write_images or config.is_default() else f"-{config.config_hash()}"
    # fuse_io: the fused actors load and write too, so the job is one operator: no pixels through the object store,
    # no per-task dispatch of load and write (measured on 2 cores: about 2% more images/s than separate tasks);
    # and rows not read yet are read by the actors themselves: not even the rows cross the object store
    io_inside = fused_io(config)
    reads_own_rows = io_inside and fused(config)
    ds = rows.pieces_dataset() if reads_own_rows else rows.dataset()
    write_args = {"output_uri": output_uri, "config_hash": config.config_hash(), "key_suffix": key_suffix,
                  "write_images": write_images, "shard_writers": shard_writers}  # fmt: skip
    if not io_inside:
        ds = ds.map_batches(
            _load,
            fn_kwargs={"io": io, "images": images, "credentials": credentials},
            batch_format="pandas",
            batch_size=res.load.batch_size,
            num_cpus=res.load.num_cpus,
            concurrency=res.load.pool_size or None,
            **res.load.ray_memory(),
            **remote,
        )
    if fused(config):
        ds = ds.map_batches(
            with_credentials(FusedCPUStage, credentials),
            fn_constructor_kwargs={"faces": config.faces, "stylize": config.stylize if stylize else None,
                                   "score": config.score, "io": io, "write": write_args if io_inside else None,
                                   "images": images, "read_piece": rows.reader.read_piece if reads_own_rows else None,
                                   "batch_rows": res.fused.batch_size},
            # reading its own rows, an actor is given a piece at a time (a block of about input_block_rows rows)
            batch_format="pandas", batch_size=1 if reads_own_rows else res.fused.batch_size,
            num_cpus=res.fused.num_cpus,
            # one pool holds the whole CPU budget: start every actor at once (Ray's autoscaler adds actors only
            # once work queues up, which a steady stream of small blocks rarely shows)
            compute=ActorPoolStrategy(size=fused_pool_size(config, cpus, memory)),
            **res.fused.ray_memory(), **remote,
        )  # fmt: skip
        if io_inside:
            return ds
    else:
        ds = ds.map_batches(
            with_credentials(FaceStage, credentials), fn_constructor_kwargs={"faces": config.faces},
            batch_format="pandas",
            batch_size=res.faces.batch_size, num_cpus=res.faces.num_cpus, compute=_pool(res.faces, cpus, gpus),
            **res.faces.ray_memory(), **remote,
        )  # fmt: skip
        if stylize:
            ds = ds.map_batches(
                with_credentials(StylizeStage, credentials),
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
            with_credentials(ScoreStage, credentials),
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
        fn_kwargs={**write_args, "io": io, "credentials": credentials},
        batch_format="pandas", batch_size=res.write.batch_size, num_cpus=res.write.num_cpus,
        concurrency=res.write.pool_size or None, **res.write.ray_memory(), **remote,
    )  # fmt: skip
    return ds

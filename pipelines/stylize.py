"""``stylid run``: manifest -> load -> faces -> stylize -> score -> write, declared on the shared runner.

``run_stylize`` reads the manifest on the driver in bounded Arrow batches (``pipelines.manifest``), subtracts the
rows already in the output (the plan: ``pipelines.plan``) and streams the rest through the chain of
``stylize_chain``'s stages (``pipelines.chain.build_chain``), whose write stage hands the rows to the job's shard
writers. A run with nothing left to do starts no stage and loads no model.
"""

from __future__ import annotations

import time

import ray

from pipelines.chain import StageSpec, build_chain, fusion_of
from pipelines.manifest import iter_manifest
from pipelines.plan import input_block_rows
from pipelines.resources import first_batch_rows
from pipelines.runner import RunResult, process_pending
from pipelines.shard_writers import ShardWriters
from pipelines.stages import SOURCE_IMAGE, FaceStage, ImageColumn, LoadStage, ScoreStage, StylizeStage, WriteStage
from stylid_core.config import JobConfig


def stylize_chain(
    config: JobConfig,
    output_uri: str = "",
    *,
    stylize: bool = True,
    images: tuple[ImageColumn, ...] = SOURCE_IMAGE,
    write_images: bool = True,
    shard_writers: ShardWriters | None = None,
    key_suffix: str | None = None,
) -> list[StageSpec]:
    """``stylid run``'s chain: load, faces, stylize, score, write. ``stylid score`` declares the same chain without
    the stylize stage (``stylize=False``), loading the output and reference images too (``images``) and writing
    only the shards (``write_images=False``); ``config`` is then a ``ScoreJobConfig`` (anything with ``faces``,
    ``score``, ``io``, ``resources`` and ``config_hash()``). Images are keyed ``<object_key(id)><key_suffix>``:
    by default ``-<config hash>`` unless the config is the default one."""
    io, res = config.io, config.resources
    if key_suffix is None:
        key_suffix = "" if not write_images or config.is_default() else f"-{config.config_hash()}"
    write = {"output_uri": output_uri, "config_hash": config.config_hash(), "key_suffix": key_suffix, "io": io,
             "write_images": write_images, "shard_writers": shard_writers}  # fmt: skip
    return [
        StageSpec(LoadStage, {"io": io, "images": images}, res.load, "io", "load"),
        StageSpec.model(FaceStage, {"faces": config.faces}, res.faces, "faces"),
        *(
            [
                StageSpec.model(
                    StylizeStage,
                    {"stylize": config.stylize, "score": config.score, "io": io, "faces": config.faces},
                    res.stylize,
                    "stylize",
                )
            ]
            if stylize
            else []
        ),  # fmt: skip
        StageSpec.model(ScoreStage, {"faces": config.faces, "score": config.score, "io": io}, res.score, "score"),
        StageSpec(WriteStage, write, res.write, "io", "write"),
    ]


def run_stylize(config: JobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Stylize and score every manifest row not yet in ``output_uri``; Ray must be initialised."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = iter_manifest(manifest_uri, config.stylize.style_uri, opts)
    cpus = ray.cluster_resources().get("CPU", 1.0)

    def build(rows, writers):
        return build_chain(rows, stylize_chain(config, output_uri, shard_writers=writers), fusion_of(config.resources))

    block_rows = lambda n: input_block_rows(n, first_batch_rows(config), cpus)  # noqa: E731
    done, counts = process_pending(manifest, output_uri, opts, build, config.io.rows_per_shard, block_rows=block_rows)
    return RunResult.of(done, counts, time.perf_counter() - t0)

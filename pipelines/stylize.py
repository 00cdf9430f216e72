"""``stylid run``: manifest -> load -> faces -> stylize -> score -> write, declared on the shared runner.

``run_stylize`` reads the manifest on the driver in bounded Arrow batches (``pipelines.manifest``), subtracts the
rows already in the output (the plan: ``pipelines.plan``) and streams the rest through the stages
(``pipelines.chain``), whose write stage hands the rows to the job's shard writers. A run with nothing left to do
starts no stage and loads no model.
"""

from __future__ import annotations

import time

import ray

from pipelines.chain import build_dataset
from pipelines.manifest import iter_manifest
from pipelines.plan import input_block_rows
from pipelines.resources import first_batch_rows
from pipelines.runner import RunResult, process_pending
from stylid_core.config import JobConfig


def run_stylize(config: JobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Stylize and score every manifest row not yet in ``output_uri``; Ray must be initialised."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = iter_manifest(manifest_uri, config.stylize.style_uri, opts)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    done, counts = process_pending(
        manifest, output_uri, opts,
        lambda rows, writers: build_dataset(config, rows, output_uri, shard_writers=writers), config.io.rows_per_shard,
        block_rows=lambda n: input_block_rows(n, first_batch_rows(config), cpus),
    )  # fmt: skip
    return RunResult(
        total_rows=len(done) + sum(counts.values()),
        already_done=len(done),
        processed=sum(counts.values()),
        seconds=time.perf_counter() - t0,
        status_counts=dict(counts),
    )

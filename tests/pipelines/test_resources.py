"""The stylize job's up-front check that its actor pools fit the cluster (shared with the customize job)."""

from __future__ import annotations

import pytest

from pipelines.chain import fused_specs, fusion_of
from pipelines.plan import MAX_INPUT_BLOCKS, input_block_rows
from pipelines.stylize import stylize_chain
from stylid_core.config import ConfigError, JobConfig
from tests.pipelines.conftest import check_run_fits as _check_fits
from tests.pipelines.conftest import run_pool_size as _pool_size


def _fused(config: JobConfig) -> list[str]:
    """The stages of ``stylid run``'s chain that run inside its fused actor."""
    return [s.name for s in fused_specs(stylize_chain(config), fusion_of(config.resources))]


def test_default_pools_fit_two_cpus_and_oversized_ones_are_refused():
    _check_fits(JobConfig(), cpus=2, gpus=0)  # the fused CPU pool, loading and writing inside
    _check_fits(JobConfig.from_dict({"resources": {"fuse_io": False}}), cpus=2, gpus=0)  # + load and write tasks
    three = {"fuse_cpu_stages": False}
    _check_fits(JobConfig.from_dict({"resources": three}), cpus=2, gpus=0)
    gpu = JobConfig.from_dict({"resources": {"stylize": {"num_gpus": 1}}})  # a GPU stage never fuses
    _check_fits(gpu, cpus=2, gpus=1)
    with pytest.raises(ConfigError, match=r"stylize: 0.5 CPU \+ 1 GPU x 1.*has 2 CPU\(s\) and 0 GPU"):
        _check_fits(gpu, cpus=2, gpus=0)
    wide = JobConfig.from_dict({"resources": {**three, "faces": {"pool_size": 4}}})
    with pytest.raises(ConfigError, match=r"need 3.5 CPU\(s\).*faces: 0.5 CPU x 4.*load 0.25, write 0.25"):
        _check_fits(wide, cpus=2, gpus=0)


def test_fused_pool_size_and_what_it_must_fit_beside():
    io_inside = JobConfig()
    assert _fused(io_inside) == ["load", "faces", "stylize", "score", "write"]
    # one single-threaded actor per CPU: 16 CPUs / 0.75 would be 21 actors on 16 cores
    assert _pool_size(io_inside, 2) == 2 and _pool_size(io_inside, 16) == 16
    apart = {"fuse_io": False}
    assert _fused(JobConfig.from_dict({"resources": apart})) == ["faces", "stylize", "score"]
    assert _pool_size(JobConfig.from_dict({"resources": apart}), 2) == 2  # 1.5 CPUs beside load and write
    assert _pool_size(JobConfig.from_dict({"resources": {**apart, "fused": {"num_cpus": 1}}}), 2) == 1
    assert _pool_size(JobConfig.from_dict({"resources": {"fused": {"pool_size": 5}}}), 2) == 5
    assert _fused(JobConfig.from_dict({"resources": {"fuse_cpu_stages": False}})) == []
    assert _fused(JobConfig.from_dict({"resources": {"stylize": {"num_gpus": 1}}})) == []  # a GPU stage never fuses
    # with the I/O inside, nothing runs beside the pool: three 0.75-CPU actors fit 2.25 CPUs; apart they don't
    three = {"fused": {"pool_size": 3}}
    _check_fits(JobConfig.from_dict({"resources": three}), cpus=2.25, gpus=0)
    with pytest.raises(ConfigError, match=r"fused: 0.75 CPU x 3, load 0.25, write 0.25"):
        _check_fits(JobConfig.from_dict({"resources": {**three, **apart}}), cpus=2.25, gpus=0)
    with pytest.raises(ConfigError, match="resources.fuse_io must be true or false"):
        JobConfig.from_dict({"resources": {"fuse_io": "yes"}})


def test_input_blocks_follow_the_batches_for_small_jobs_and_are_capped_for_large_ones():
    """Every job (run, score, customize, training pairs) cuts its pending rows into blocks of ``input_block_rows``:
    small jobs into the first stage's batches (each CPU some), large ones into at most ``MAX_INPUT_BLOCKS`` blocks
    (4 a CPU beyond)."""
    assert input_block_rows(100, first_batch=64, cpus=2) == 50  # two blocks of 50: each CPU some
    assert input_block_rows(100, first_batch=16, cpus=2) == 16  # the first stage's batches
    per_block = input_block_rows(1_000_000, first_batch=64, cpus=2)
    assert per_block == 2_000 and -(-1_000_000 // per_block) == MAX_INPUT_BLOCKS
    assert -(-1_000_000 // input_block_rows(1_000_000, first_batch=4, cpus=256)) == 4 * 256
    assert input_block_rows(0, first_batch=4, cpus=1) == 1

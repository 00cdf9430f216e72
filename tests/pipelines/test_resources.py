"""The stylize job's up-front check that its actor pools fit the cluster (shared with the customize job)."""

from __future__ import annotations

import pytest

from pipelines.stylize import _check_fits
from stylid_core.config import ConfigError, JobConfig


def test_default_pools_fit_two_cpus_and_oversized_ones_are_refused():
    _check_fits(JobConfig(), cpus=2, gpus=0)  # fused CPU pool + load + write
    three = {"fuse_cpu_stages": False}
    _check_fits(JobConfig.from_dict({"resources": three}), cpus=2, gpus=0)
    gpu = JobConfig.from_dict({"resources": {"stylize": {"num_gpus": 1}}})  # a GPU stage never fuses
    _check_fits(gpu, cpus=2, gpus=1)
    with pytest.raises(ConfigError, match=r"stylize: 0.5 CPU \+ 1 GPU x 1.*has 2 CPU\(s\) and 0 GPU"):
        _check_fits(gpu, cpus=2, gpus=0)
    wide = JobConfig.from_dict({"resources": {**three, "faces": {"pool_size": 4}}})
    with pytest.raises(ConfigError, match=r"need 3.5 CPU\(s\).*faces: 0.5 CPU x 4.*load 0.25, write 0.25"):
        _check_fits(wide, cpus=2, gpus=0)

"""Shared fixtures: one local Ray for the whole run, every listener on 127.0.0.1; `gpu` tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest

# set before anything starts Ray, so the session's Ray and its workers keep every server on loopback
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu and torch.cuda.is_available() is false")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs for the whole test run (started on first use, shut down at the end)."""
    import ray

    from jobs.ray_cluster import init_ray

    init_ray(num_cpus=2, quiet=True)
    yield ray
    ray.shutdown()

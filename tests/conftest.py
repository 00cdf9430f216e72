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


#: what the standard AWS environment variables point at during the test run (the S3 fixture's server)
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1, reached through the standard AWS environment variables.

    They are set before Ray starts (``ray_session`` depends on this fixture), so Ray's workers inherit them.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A local Ray with 2 CPUs for the whole test run (started on first use, shut down at the end)."""
    import ray

    from jobs.ray_cluster import init_ray

    init_ray(num_cpus=2, quiet=True)
    yield ray
    ray.shutdown()

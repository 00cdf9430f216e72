"""The Arrow allocator of a job's processes: jemalloc, where this pyarrow has it.

pyarrow's wheels default to mimalloc, which keeps pages it has freed: the driver, reading a manifest batch by batch,
grew with the manifest though it held 9 bytes a row (measured, one plan: +62 MB from 10k to 1M rows under
mimalloc, +36 MB under jemalloc; reading a 1M-row manifest page by page alone: +48 MB against +8 MB). The choice
is ``ARROW_DEFAULT_MEMORY_POOL``, set for this process's pool now and in the environment, so that a local Ray's
workers inherit it and a cluster's get it with the stages' ``runtime_env`` (``pipelines.credentials.PUBLIC_ENV``).
A value the user has set is kept.
"""

from __future__ import annotations

import os

import pyarrow as pa

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def use_jemalloc() -> str:
    """Make jemalloc this job's Arrow allocator unless ``ARROW_DEFAULT_MEMORY_POOL`` names another or this pyarrow
    has none; returns the backend this process allocates with."""
    if POOL_ENV not in os.environ:
        try:
            pa.jemalloc_memory_pool()
        except NotImplementedError:  # a pyarrow built without jemalloc
            return pa.default_memory_pool().backend_name
        os.environ[POOL_ENV] = "jemalloc"
    if os.environ[POOL_ENV] == "jemalloc" and pa.default_memory_pool().backend_name != "jemalloc":
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    return pa.default_memory_pool().backend_name

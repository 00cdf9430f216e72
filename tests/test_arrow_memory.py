"""The job's Arrow allocator (``jobs.arrow_memory``): jemalloc for the driver and, through the environment, its
workers; a user's own choice kept. Each case in a fresh interpreter: the pool is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import json, os, pyarrow as pa; from jobs.arrow_memory import use_jemalloc; got = use_jemalloc();"
    " print(json.dumps([got, pa.default_memory_pool().backend_name, os.environ.get('ARROW_DEFAULT_MEMORY_POOL')]))"
)


def _probe(**env: str) -> list:
    base = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**base, "PYTHONPATH": REPO, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_jemalloc() -> bool:
    try:
        pa.jemalloc_memory_pool()
        return True
    except NotImplementedError:
        return False


@pytest.mark.skipif(not _has_jemalloc(), reason="this pyarrow is built without jemalloc")
def test_the_job_allocates_with_jemalloc_and_passes_it_on():
    assert _probe() == ["jemalloc", "jemalloc", "jemalloc"]


def test_a_users_allocator_is_kept():
    assert _probe(ARROW_DEFAULT_MEMORY_POOL="system") == ["system", "system", "system"]


def test_the_allocator_reaches_cluster_workers_with_the_stages_environment(monkeypatch):
    from pipelines.credentials import stage_runtime_env

    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    assert stage_runtime_env()["runtime_env"]["env_vars"]["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"

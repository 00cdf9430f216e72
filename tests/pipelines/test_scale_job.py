"""Row-sized shards through the real job on a local Ray, with the cheap ``stylize_null`` config (one centred face
per image, identity stylizer): shards follow the rows, not the compute batches, and a driver killed mid-run loses
only the rows it had not flushed, which the rerun redoes exactly once."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.config import load_job_config
from jobs.run import run_job
from stylid_core.ledger import compact, done_ids
from stylid_core.sample_data import write_face_crops
from tests.pipelines.conftest import write_manifest
from tests.processes import kill_and_wait, note_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _manifest(tmp, n: int, crops: list[str]) -> str:
    rows = [{"image_id": f"row{k:06d}", "image_uri": crops[k % len(crops)]} for k in range(n)]
    return write_manifest(str(tmp / f"manifest{n}.parquet"), rows)


def _names(output: str, sub: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"{output}/{sub}/part-*.parquet"))


def _table(output: str, sub: str) -> pd.DataFrame:
    return pd.concat([pq.read_table(f"{output}/{sub}/{n}").to_pandas() for n in _names(output, sub)])


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list[str]:
    return write_face_crops(str(tmp_path_factory.mktemp("crops")), 24)


def test_shards_follow_the_rows_not_the_batches(ray_session, crops, tmp_path):
    config = load_job_config("stylize_null", ["io.rows_per_shard=16", "resources.fused.batch_size=4"])
    output = str(tmp_path / "out")
    info = run_job(config, output, _manifest(tmp_path, 50, crops))
    assert info["this_run"]["processed"] == 50 and info["this_run"]["status_counts"] == {"ok": 50}
    sizes = sorted(pq.read_metadata(f"{output}/metrics/{n}").num_rows for n in _names(output, "metrics"))
    assert sizes == [2, 16, 16, 16]  # 13 batches of 4 rows: full shards as the rows come, the rest at the end
    assert _names(output, "faces") == _names(output, "metrics")
    metrics, faces = _table(output, "metrics"), _table(output, "faces")
    assert sorted(metrics["image_id"]) == [f"row{k:06d}" for k in range(50)]
    assert faces["image_id"].is_unique and set(faces["image_id"]) == set(metrics["image_id"])
    assert (faces["backend"] == "centered").all() and faces["id_sim"].min() > 0.999  # identity stylizer
    assert info["summary"]["rows"] == 50 and info["summary"]["faces"] == 50
    assert len(os.listdir(f"{output}/images")) == 50
    # compacting a fresh output changes nothing (its shards are full, but for the last)
    before = _names(output, "metrics")
    assert compact(output, {}, 16).groups == 0 and _names(output, "metrics") == before


@pytest.mark.slow
def test_a_driver_killed_mid_run_loses_only_unflushed_rows(ray_session, crops, tmp_path):
    """``stylid run`` in its own process (and its own local Ray), killed with SIGKILL once a few shards are in:
    the ledger holds whole shards only, and the rerun processes exactly the other rows, each id once, with no
    faces shard left without its metrics shard."""
    n = 3000
    manifest = _manifest(tmp_path, n, crops)
    output = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--manifest", manifest, "--output", output, "--config",
           "stylize_null", "--set", "io.rows_per_shard=25", "--num-cpus", "2", "--no-report"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    seen: dict = {}  # the driver's process tree: its local Ray and the Ray workers
    try:
        deadline = time.monotonic() + 240
        while len(_names(output, "metrics")) < 3 and proc.poll() is None and time.monotonic() < deadline:
            note_tree(proc.pid, seen)
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        note_tree(proc.pid, seen)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, and what of its local Ray shares its process group
        proc.wait()
        # the rest of the local Ray (the raylet starts its workers in their own groups) would end only once it saw
        # the driver gone, and a shard writer could still finish a put it had begun: so every process of the
        # killed run is ended (by PID) before the ledger is read
        kill_and_wait(list(seen.values()))
    done = len(done_ids(output, {}))
    assert 0 < done < n and done % 25 == 0  # whole shards only
    assert len(glob.glob(f"{output}/images/*.png")) >= done
    assert not os.path.exists(f"{output}/_SUCCESS")
    config = load_job_config("stylize_null", ["io.rows_per_shard=25"])
    info = run_job(config, output, manifest, report=False)
    assert info["this_run"]["already_done"] == done
    assert info["this_run"]["processed"] == n - done
    metrics, faces = _table(output, "metrics"), _table(output, "faces")
    assert metrics["image_id"].is_unique and len(metrics) == n
    assert faces["image_id"].is_unique and len(faces) == n
    assert _names(output, "faces") == _names(output, "metrics")
    assert len(glob.glob(f"{output}/images/*.png")) == n
    assert os.path.isfile(f"{output}/_SUCCESS")

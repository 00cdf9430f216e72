"""``ray job submit --working-dir . -- stylid run ...`` to a head and a worker started with ``ray start``, inside a
namespace with only loopback (``tests/cluster_namespace.py``): the job finishes and its output is whole."""

from __future__ import annotations

import glob
import os
import shlex
import shutil

import pandas as pd
import psutil
import pytest

from tests.cluster_namespace import namespace_unavailable, submit_in_namespace
from tests.pipelines.netcheck import is_loopback
from tests.test_local_ray import small_photos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def namespace():
    why = namespace_unavailable()
    if why:
        pytest.skip(why)


def _processes_using(folder: str) -> list[tuple[int, str]]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.cwd().startswith(folder) or any(f.path.startswith(folder) for f in p.open_files()):
                found.append((p.pid, p.name()))
        except psutil.Error:
            continue
    return found


def test_stylid_run_then_score_submitted_to_a_two_node_cluster_write_every_id_once(namespace, tmp_path, request):
    rows = small_photos(str(tmp_path / "photos"), 6, side=128)
    rows.append({"image_id": "gone", "image_uri": str(tmp_path / "photos" / "not-there.jpg")})
    pd.DataFrame(rows).to_parquet(tmp_path / "manifest.parquet", index=False)
    output, scores = tmp_path / "out", tmp_path / "scores"
    # one job, as the nightly RayCronJob runs them: stylize, then score that output (both on the cluster)
    run = shlex.join(["stylid", "run", "--manifest", str(tmp_path / "manifest.parquet"), "--output", str(output),
                      "--no-report"])  # fmt: skip
    score = shlex.join(["stylid", "score", "--manifest", str(output), "--output", str(scores), "--no-report"])
    result = submit_in_namespace(f"{run} && {score}")
    request.addfinalizer(lambda: shutil.rmtree(result.ray_dir, ignore_errors=True))
    assert result.returncode == 0, result.log[-4000:]
    assert result.interfaces == ["lo:"], result.interfaces  # the cluster could reach nothing, and nothing it
    # ... and within it, every server of both nodes listened on loopback, the head's GCS and dashboard included
    listeners = [(a.rsplit(":", 1)[0].strip("[]"), int(a.rsplit(":", 1)[1])) for a in result.listeners]
    assert listeners and all(is_loopback(host) for host, _ in listeners), result.listeners
    assert {6379, 8265} <= {port for _, port in listeners}, result.listeners
    metrics = pd.concat(pd.read_parquet(f) for f in glob.glob(str(output / "metrics" / "*.parquet")))
    assert sorted(metrics["image_id"]) == sorted(r["image_id"] for r in rows)  # every id, once
    status = dict(zip(metrics["image_id"], metrics["status"]))
    assert status.pop("gone") == "missing" and set(status.values()) == {"ok"}, status
    assert len(os.listdir(output / "images")) == 6 and os.path.exists(output / "_SUCCESS")
    # stylid score of that output, on the same cluster: every id once, the run's rows scored, its error row kept
    scored = pd.concat(pd.read_parquet(f) for f in glob.glob(str(scores / "metrics" / "*.parquet")))
    assert sorted(scored["image_id"]) == sorted(r["image_id"] for r in rows)
    score_status = dict(zip(scored["image_id"], scored["status"]))
    assert score_status.pop("gone") == "missing" and set(score_status.values()) == {"ok"}, score_status
    assert os.path.exists(scores / "_SUCCESS")
    # the job ran on the cluster (the worker node: the head has no CPU), not in a local Ray of the driver's
    workers = glob.glob(os.path.join(result.ray_dir, "session_*", "logs", "worker-*.out"))
    assert workers, "no worker log in the cluster's session"
    assert not _processes_using(result.ray_dir), "processes of the namespace's cluster outlived it"

"""The local Ray that ``init_ray`` starts: new (never a ``ray start`` cluster found on the machine), on loopback
whatever imported Ray first, and keeping idle task workers for reuse while actors hold the CPUs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from jobs.ray_cluster import worker_soft_limit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tasks_between_busy_actors_reuse_their_worker(ray_session):
    """Two actors hold the 2 CPUs, as the fused pool does; small tasks arrive 1.5 s apart, as load and write tasks
    do in a CPU job: they must run in the workers already there, not boot a new process (~1.7 s of CPU) each."""
    ray = ray_session
    assert os.environ["RAY_num_workers_soft_limit"] == str(worker_soft_limit(2))

    @ray.remote(num_cpus=0.75)
    class Holder:
        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0.25)
    def task() -> int:
        return os.getpid()

    holders = [Holder.remote() for _ in range(2)]
    ray.get([h.pid.remote() for h in holders])
    pids = []
    for _ in range(5):
        pids.append(ray.get(task.remote()))
        time.sleep(1.5)
    for h in holders:
        ray.kill(h)
    assert len(set(pids)) <= 2, f"5 spaced tasks ran in {len(set(pids))} different worker processes: {pids}"


def test_local_ray_is_new_and_on_loopback_even_with_ray_imported_first(tmp_path):
    """In a fresh process that imported Ray before ``init_ray`` (so Ray read its settings already) and has no
    loopback setting in its environment, and where a ``ray start`` left a cluster address behind: ``init_ray``
    still starts a new local Ray, on 127.0.0.1."""
    temp = tempfile.mkdtemp(prefix="stylid-rt-")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # what `ray start --head` leaves; nothing listens there
        code = (
            "import ray\n"
            "from jobs.ray_cluster import init_ray\n"
            "init_ray(num_cpus=1, quiet=True)\n"
            "print('NODE', ray.util.get_node_ip_address())\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"PYTHONPATH": REPO, "RAY_TMPDIR": temp})
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("NODE", "GCS")))
        assert lines["NODE"] == "127.0.0.1"
        assert lines["GCS"].startswith("127.0.0.1:") and lines["GCS"] != "127.0.0.1:1"
    finally:
        shutil.rmtree(temp, ignore_errors=True)

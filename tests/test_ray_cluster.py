"""The local Ray that ``init_ray`` starts keeps idle task workers for reuse while actors hold the CPUs."""

from __future__ import annotations

import os
import time

from jobs.ray_cluster import worker_soft_limit


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

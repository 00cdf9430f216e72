"""Resources and pools: how many actors each stage's pool gets (``_pool``, ``fused_pool_size``), and the check that
every pool's first actors fit the Ray cluster's CPUs, GPUs and memory at once (``check_pools_fit``; else Ray Data
waits forever for the pool that cannot start). The chain builder (``pipelines.chain``) applies them to any chain."""

from __future__ import annotations

from ray.data import ActorPoolStrategy

from pipelines.credentials import stage_runtime_env
from stylid_core.config import ConfigError, JobConfig, StageResources


def _pool(res: StageResources, total_cpus: float, total_gpus: float) -> ActorPoolStrategy:
    if res.pool_size:
        return ActorPoolStrategy(size=res.pool_size)
    if res.num_gpus > 0:
        limit = total_gpus / res.num_gpus
    else:
        limit = total_cpus / max(res.num_cpus, 0.01)
    return ActorPoolStrategy(min_size=1, max_size=max(1, int(limit)))


def check_pools_fit(
    pools: dict[str, StageResources], tasks: dict[str, float], cpus: float, gpus: float, memory: float | None = None
) -> None:
    """Every actor pool's first actors (``pool_size``, at least one) must fit at once beside one task of each
    stateless step (``tasks``: name -> CPUs); otherwise Ray Data waits forever for the pool that cannot start.
    Raise ``ConfigError`` with the numbers instead. ``memory``: the cluster's memory resource in bytes, checked
    against the pools' declared ``memory_mb`` when given."""
    need_cpu = sum(r.num_cpus * max(1, r.pool_size) for r in pools.values()) + sum(tasks.values())
    need_gpu = sum(r.num_gpus * max(1, r.pool_size) for r in pools.values())
    need_mem = sum(r.memory_mb * max(1, r.pool_size) for r in pools.values()) * 2**20
    if memory is not None and need_mem > memory:
        detail = ", ".join(
            f"{k}: {r.memory_mb:g} MiB x {max(1, r.pool_size)}" for k, r in pools.items() if r.memory_mb
        )
        raise ConfigError(
            f"the stages declare {need_mem / 2**30:.2f} GiB of memory to run at once ({detail}) but the Ray cluster"
            f" has {memory / 2**30:.2f} GiB; lower resources.<stage>.memory_mb or pool_size, or lower"
            " io.max_work_pixels with them"
        )
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        gpu = lambda r: f" + {r.num_gpus:g} GPU" if r.num_gpus else ""  # noqa: E731
        detail = ", ".join(
            [f"{k}: {r.num_cpus:g} CPU{gpu(r)} x {max(1, r.pool_size)}" for k, r in pools.items()]
            + [f"{k} {c:g}" for k, c in tasks.items()]
        )
        raise ConfigError(
            f"the stages need {need_cpu:g} CPU(s) and {need_gpu:g} GPU(s) to run at once ({detail}) but the Ray"
            f" cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s); lower resources.<stage>.num_cpus / num_gpus /"
            " pool_size"
        )


def stage_remote_args() -> dict:
    """``ray_remote_args`` for every stage: the driver's non-secret environment (``pipelines.credentials``);
    credentials go through ``with_credentials`` / the task functions' ``credentials`` argument instead."""
    return stage_runtime_env()


def fused(config: JobConfig) -> bool:
    """Whether faces, stylize and score run as one CPU actor pool (``resources.fuse_cpu_stages``, no GPU asked)."""
    res = config.resources
    return res.fuse_cpu_stages and not any(r.num_gpus > 0 for r in (res.faces, res.stylize, res.score))


def first_batch_rows(config: JobConfig) -> int:
    """The batch size of a job's first stage with a model (the fused pool's, else the faces stage's)."""
    return config.resources.fused.batch_size if fused(config) else config.resources.faces.batch_size


def fused_pool_size(fused: StageResources, cpus: float, beside: float = 0.0, memory: float | None = None) -> int:
    """Actors of a fused pool: ``pool_size``, else as many as the CPUs left beside the chain's tasks (``beside``:
    their CPUs) allow, at most one per CPU (each actor is single-threaded CPU work; more would only hold more
    models in memory), and no more than the cluster's ``memory`` (bytes) holds at the declared ``memory_mb``
    each."""
    if fused.pool_size:
        return fused.pool_size
    size = min(int((cpus - beside) / fused.num_cpus + 1e-9), int(cpus + 1e-9))
    if memory is not None and fused.memory_mb > 0:
        size = min(size, int(memory / (fused.memory_mb * 2**20)))
    return max(1, size)

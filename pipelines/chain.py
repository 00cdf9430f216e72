"""The one chain builder: a job declares its stages (``StageSpec``), and ``build_chain`` maps them on its rows into
one lazy Ray dataset, fusing the CPU stages into one actor pool where the job asks (``Fusion``), with every pool
sized against the cluster and checked to fit it (``pipelines.resources``).

Kinds: an ``io`` stage (load, write) runs as stateless tasks, built per batch; a ``cpu`` or ``gpu`` stage (a model)
as an actor pool, so its model loads once an actor. ``cpu`` stages fuse: with a ``Fusion`` and no ``gpu`` stage in
the chain, the model stages (and, with ``Fusion.io``, the io stages too) run inside one actor (``FusedCPUStage``),
no pixels between processes; a fused pool that loads its own rows reads the plan's pieces itself
(``PendingRows.pieces_dataset``), so not even the rows cross the object store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ray
import ray.data
from ray.data import ActorPoolStrategy

from pipelines.credentials import StageCredentials, with_credentials
from pipelines.plan import PendingRows
from pipelines.resources import _pool, check_pools_fit, fused_pool_size, stage_remote_args
from pipelines.stages import FusedCPUStage
from stylid_core.config import StageResources

IO, CPU, GPU = "io", "cpu", "gpu"


@dataclass(frozen=True)
class StageSpec:
    """One stage of a job's chain: ``cls(**kwargs)`` is called on each pandas batch; ``resources`` its batch size,
    CPUs, GPUs, pool size and memory; ``kind`` ``io``, ``cpu`` or ``gpu`` (``model`` picks cpu or gpu from the
    resources); ``name`` the resources' name in the job's config, named by the fit check's errors; ``batch_format``
    what ``cls`` is given (``pandas``, or ``numpy``: a dict of arrays); ``max_actors``: a model stage's pool grows
    from one actor to this many (0: sized by ``_pool`` from ``resources``)."""

    cls: Callable
    kwargs: dict
    resources: StageResources
    kind: str
    name: str
    batch_format: str = "pandas"
    max_actors: int = 0

    @classmethod
    def model(cls, stage: Callable, kwargs: dict, resources: StageResources, name: str) -> StageSpec:
        """A stage with a model: an actor pool, on GPUs where its resources ask for any."""
        return cls(stage, kwargs, resources, GPU if resources.num_gpus > 0 else CPU, name)

    def make(self):
        return self.cls(**self.kwargs)


@dataclass(frozen=True)
class Fusion:
    """A job's CPU stages in one actor pool of ``resources``; ``io``: its io stages inside it too."""

    resources: StageResources
    io: bool = True


def fusion_of(resources) -> Fusion | None:
    """A job config's ``resources`` (``fuse_cpu_stages``, ``fuse_io``, ``fused``) as a ``Fusion``, or None."""
    return Fusion(resources.fused, resources.fuse_io) if resources.fuse_cpu_stages else None


def fused_specs(specs: list[StageSpec], fusion: Fusion | None) -> list[StageSpec]:
    """The specs that run inside the fused actor: none without a ``Fusion`` or with a ``gpu`` stage; else the model
    stages, and with ``fusion.io`` the io stages too."""
    if fusion is None or any(s.kind == GPU for s in specs) or not any(s.kind == CPU for s in specs):
        return []
    return [s for s in specs if s.kind == CPU or fusion.io]


def check_chain_fits(
    specs: list[StageSpec], fusion: Fusion | None, cpus: float, gpus: float, memory: float | None = None
) -> None:
    """``ConfigError`` unless every pool of the chain (the fused one, else each model stage's) fits the cluster at
    once beside one task of each io stage left outside it (``check_pools_fit``)."""
    inside = fused_specs(specs, fusion)
    pools = {"fused": fusion.resources} if inside else {}
    pools |= {s.name: s.resources for s in specs if s.kind != IO and s not in inside}
    tasks = {s.name: s.resources.num_cpus for s in specs if s.kind == IO and s not in inside}
    check_pools_fit(pools, tasks, cpus, gpus, memory)


def chain_pool_size(specs: list[StageSpec], fusion: Fusion, cpus: float, memory: float | None = None) -> int:
    """Actors of the chain's fused pool: the CPUs left beside its io tasks (``fused_pool_size``)."""
    inside = fused_specs(specs, fusion)
    beside = sum(s.resources.num_cpus for s in specs if s.kind == IO and s not in inside)
    return fused_pool_size(fusion.resources, cpus, beside, memory)


def _task(spec: StageSpec, credentials: StageCredentials | None) -> Callable:
    """An io stage as a Ray task function named after its class: credentials exported, the stage built, called."""

    def task(batch):
        if credentials:
            credentials.export()
        return spec.make()(batch)

    task.__name__ = task.__qualname__ = getattr(spec.cls, "__name__", "stage")
    return task


def _map(ds: ray.data.Dataset, spec: StageSpec, cpus: float, gpus: float, credentials, remote: dict):
    res = spec.resources
    if spec.kind == IO:
        return ds.map_batches(_task(spec, credentials), batch_format="pandas", batch_size=res.batch_size,
                              num_cpus=res.num_cpus, concurrency=res.pool_size or None, **res.ray_memory(),
                              **remote)  # fmt: skip
    pool = ActorPoolStrategy(min_size=1, max_size=spec.max_actors) if spec.max_actors else _pool(res, cpus, gpus)
    return ds.map_batches(with_credentials(spec.cls, credentials), fn_constructor_kwargs=spec.kwargs,
                          batch_format=spec.batch_format, batch_size=res.batch_size, num_cpus=res.num_cpus,
                          num_gpus=res.num_gpus or None, compute=pool, **res.ray_memory(), **remote)  # fmt: skip


def build_chain(
    rows: PendingRows | ray.data.Dataset,
    specs: list[StageSpec],
    fusion: Fusion | None = None,
    cluster: dict | None = None,
) -> ray.data.Dataset:
    """The lazy dataset of ``specs`` chained on ``rows`` (a plan's ``PendingRows``, read as it runs, or a dataset);
    nothing runs until it is consumed. ``cluster``: Ray's resources (``ray.cluster_resources()`` when None), which
    every pool must fit (``check_chain_fits``, a ``ConfigError`` before any stage starts) and the fused pool is
    sized against. Rows enter in small blocks (an actor takes a whole block), so every actor has work as soon as
    the first rows are in and until the last."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    cpus, gpus, memory = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0), cluster.get("memory")
    check_chain_fits(specs, fusion, cpus, gpus, memory)
    remote = stage_remote_args()  # endpoint, region and offline flags reach every worker; credentials in memory:
    credentials = StageCredentials.from_environ()
    inside = fused_specs(specs, fusion)
    if inside:
        first, last = specs.index(inside[0]), specs.index(inside[-1])
        if specs[first : last + 1] != inside:
            raise ValueError(f"the fused stages must be consecutive: {[s.name for s in specs]}")
    # a fused pool that loads its own rows reads the plan's pieces itself: no rows through the object store
    reads_own_rows = bool(inside) and inside[0].kind == IO and isinstance(rows, PendingRows)
    if isinstance(rows, PendingRows):
        ds = rows.pieces_dataset() if reads_own_rows else rows.dataset()
    else:
        ds = rows
    if not inside:
        for spec in specs:
            ds = _map(ds, spec, cpus, gpus, credentials, remote)
        return ds
    for spec in specs[:first]:
        ds = _map(ds, spec, cpus, gpus, credentials, remote)
    res = fusion.resources
    ds = ds.map_batches(
        with_credentials(FusedCPUStage, credentials),
        fn_constructor_kwargs={"stages": [(s.cls, s.kwargs) for s in inside],
                               "read_piece": rows.reader.read_piece if reads_own_rows else None,
                               "batch_rows": res.batch_size},
        # reading its own rows, an actor is given a piece at a time (a block of about input_block_rows rows)
        batch_format="pandas", batch_size=1 if reads_own_rows else res.batch_size, num_cpus=res.num_cpus,
        # one pool holds the whole CPU budget: start every actor at once (Ray's autoscaler adds actors only once
        # work queues up, which a steady stream of small blocks rarely shows)
        compute=ActorPoolStrategy(size=chain_pool_size(specs, fusion, cpus, memory)), **res.ray_memory(), **remote,
    )  # fmt: skip
    for spec in specs[last + 1 :]:
        ds = _map(ds, spec, cpus, gpus, credentials, remote)
    return ds

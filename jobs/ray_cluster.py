"""Starting or joining Ray: a local Ray on 127.0.0.1 when no address is given, else the cluster at
``--address`` / ``RAY_ADDRESS`` (which is how ``ray job submit`` runs the same command on a cluster)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def worker_soft_limit(cpus: int) -> int:
    """Idle worker processes a node keeps for reuse (Ray's ``num_workers_soft_limit``; its default is the CPU count).

    Actor pools hold workers too, so with Ray's default a node whose CPUs are taken by actors may kill surplus idle
    task workers, and a later load or write task then boots a fresh worker process (about 1.7 s of CPU on the
    2-core machine). Seen here in runs of the CPU job on a busy machine (7 to 11 task workers booted for 45 rows);
    on a quiet one both limits kept to the 2 prestarted workers. A worker is only started when a task needs one,
    so the extra room costs nothing unused. Local Ray only: on a cluster set ``RAY_num_workers_soft_limit`` on
    the nodes (``infra/Dockerfile`` does).
    """
    return cpus + 8


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=not quiet)
        return
    # a local Ray for this process only, every listener on loopback (measured here: this variable is what makes
    # Ray's listeners bind 127.0.0.1; the node address alone did not)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_num_workers_soft_limit", str(worker_soft_limit(num_cpus or os.cpu_count() or 1)))
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING,
    )

"""Starting or joining Ray: a local Ray on 127.0.0.1 when no address is given, else the cluster at
``--address`` / ``RAY_ADDRESS`` (which is how ``ray job submit`` runs the same command on a cluster)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


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
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING,
    )

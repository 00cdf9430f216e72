"""Starting or joining Ray: a local Ray on 127.0.0.1 when no address is given, else the cluster at
``--address`` / ``RAY_ADDRESS`` (which is how ``ray job submit`` runs the same command on a cluster)."""

from __future__ import annotations

import logging
import os
import sys

from jobs import ray_reaper

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


#: where a local Ray may listen; anything else is refused
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _keep_local_ray_on_loopback() -> None:
    """Make the local Ray this process starts bind every listener to 127.0.0.1.

    Ray (2.60) binds its gRPC servers (GCS, raylet, object manager, workers, actors), the dashboard and runtime-env
    agents and the metrics exporter to the node's IP address, and ``ray.init`` replaces a loopback
    ``_node_ip_address`` with the machine's address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is 0 ("this Ray is
    not part of a cluster": ``ray._private.services.get_node_ip_address`` then answers 127.0.0.1, and every
    process is started with that address). Ray reads the variable once, when ``ray._private.ray_constants`` is
    first imported, so where Ray was imported before this call the module's flag is set to match. The variable
    is inherited by the processes Ray starts, which read it the same way. Measured with ``ss -ltnp``: with it,
    every listener of the session is on 127.0.0.1; without it, on ``*`` and on the machine's address.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        constants.ENABLE_RAY_CLUSTER = False


#: seconds to wait for the TCP connection to a cluster's address before giving up (ray.init itself waits forever)
CONNECT_TIMEOUT_S = 10.0
#: seconds to wait for the cluster's GCS to answer (its client gives up after 40 s; ray.init then tries 20 times)
GCS_TIMEOUT_S = 45.0


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port``, ``[v6]:port`` or ``ray://host:port`` address; None for ``auto`` and the
    other forms Ray resolves itself."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _tcp_problem(target: tuple[str, int], timeout_s: float) -> str | None:
    """Why a TCP connection to ``target`` does not open within ``timeout_s``; None when it opens."""
    import socket

    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            return f"no answer within {timeout_s:g} s"
        return (exc.strerror or type(exc).__name__).lower()
    return None


def _gcs_problem(address: str, timeout_s: float) -> str | None:
    """Why ``address`` does not answer as a Ray cluster's GCS within ``timeout_s`` (asked from a daemon thread: the
    client blocks for 40 s on a port that accepts connections but is no Ray); None when it answers."""
    import threading

    from ray._raylet import GcsClient

    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            GcsClient(address=address)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=ask, name="stylid-gcs-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no Ray cluster answered there within {timeout_s:g} s"
    if outcome[0] is not None:
        return f"no Ray cluster answered there ({type(outcome[0]).__name__}: {' '.join(str(outcome[0]).split())})"
    return None


def check_reachable(
    address: str,
    given: str = "RAY_ADDRESS",
    timeout_s: float = CONNECT_TIMEOUT_S,
    gcs_timeout_s: float = GCS_TIMEOUT_S,
) -> None:
    """``ConfigError`` (one line, exit 2) unless the cluster at ``address`` answers: a TCP connection opens within
    ``timeout_s`` and, for a GCS address, the GCS answers within ``gcs_timeout_s``. An unreachable ``RAY_ADDRESS``
    made ``ray.init`` wait (20 tries of 40 s) without a word. Ray connects to a loopback address through the
    machine's own address (``127.0.0.1:1`` became ``<interface ip>:1``): that address is the one checked, and
    the message says so when it differs."""
    from stylid_core.config import ConfigError

    target = _host_port(address)
    if target is None:
        return
    where = f"the Ray cluster at {address} ({given})"
    problem = _tcp_problem(target, timeout_s)
    if problem is None and "://" not in address:  # a GCS address (ray:// is the Ray Client's own protocol)
        from ray._private.services import canonicalize_bootstrap_address

        joined = canonicalize_bootstrap_address(address) or address
        if joined != address:
            where += f", which Ray joins as {joined},"
            problem = _tcp_problem(_host_port(joined) or target, timeout_s)
        problem = problem or _gcs_problem(joined, gcs_timeout_s)
    if problem is not None:
        raise ConfigError(f"{where} cannot be reached: {problem}; unset RAY_ADDRESS to run on a local Ray")


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster at ``address`` / ``$RAY_ADDRESS``, or start a local Ray for this process.

    The local Ray listens on 127.0.0.1 only (checked after start: a node on another address is shut down and
    refused), and a watchdog (``jobs.ray_reaper``) ends every process of it when this process ends, however it
    ends; leftovers of earlier sessions whose driver and watchdog were both killed are ended first.
    """
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, given)
    else:
        _keep_local_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:  # the cluster's own settings (token authentication, ...) apply
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=not quiet)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only, this process's own Ray: no token to manage
    os.environ.setdefault("RAY_num_workers_soft_limit", str(worker_soft_limit(num_cpus or os.cpu_count() or 1)))
    temp_dir = ray_temp_dir()
    ended = ray_reaper.reap_orphaned_sessions(temp_dir)
    if ended:
        log.warning("ended %d processes left by an earlier local Ray of stylid whose driver was killed", ended)
    # the watchdog starts first, so a driver killed during ray.init leaves nothing either; the token marks the
    # processes ray.init starts (and, through the raylet, every worker), nothing this process starts later
    record = ray_reaper.new_record()
    record_path = ray_reaper.save_record(record, temp_dir)
    watchdog = ray_reaper.start_watchdog(record, record_path)
    _watchdogs.append(watchdog)
    os.environ[ray_reaper.TOKEN_ENV] = record.token
    try:
        ray.init(
            address="local",  # a new Ray, never one found through /tmp/ray/ray_current_cluster (`ray start`)
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    finally:
        os.environ.pop(ray_reaper.TOKEN_ENV, None)
    record.session_dir = _session_dir(ray)
    ray_reaper.save_record(record, temp_dir)
    ray_reaper.tell_session_dir(watchdog, record.session_dir)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not on 127.0.0.1; refusing to run on it")


#: the watchdogs of this process's local Rays (kept so that their stdin pipes stay open while this process lives)
_watchdogs: list = []


def ray_temp_dir() -> str:
    """Ray's temp folder, by Ray's own rule: ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else ``/tmp/ray``."""
    return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")


def _session_dir(ray) -> str:
    """The local Ray's session folder (its logs; the watchdog finds orphaned agents by the files they hold)."""
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        return ""

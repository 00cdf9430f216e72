"""Which sockets the processes of a local Ray listen on, and whether any is reachable from beyond this machine."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

import psutil

#: Ray's processes, by name, that a job's session must show listening (all of them must be on loopback)
RAY_LISTENERS = ("raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``); ``0.0.0.0``/``::`` (every interface) and
    the machine's own addresses are not."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def ray_pids(root: int | None = None) -> set[int]:
    """``root`` (default: this process, the driver) and every process it started: the local Ray's gcs_server,
    raylet, agents, and the workers the raylet starts. (Other Ray instances on the machine are not descendants
    and are not looked at.)"""
    me = psutil.Process(root or os.getpid())
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def listeners(root: int | None = None) -> set[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket and bound UDP socket (IPv4 and IPv6) of
    ``root``'s process tree."""
    pids = ray_pids(root)
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            found.add((c.pid, name, c.laddr.ip, c.laddr.port))
    return found


class ListenerWatch:
    """Polls ``listeners(root)`` in a thread while a block runs; ``seen`` collects everything observed."""

    def __init__(self, root: int | None = None, interval: float = 0.3) -> None:
        self.root = root
        self.interval = interval
        self.seen: set[tuple[int, str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        try:
            self.seen |= listeners(self.root)
        except psutil.NoSuchProcess:  # the watched process has ended
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def __enter__(self) -> ListenerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def not_loopback(self) -> list[tuple[int, str, str, int]]:
        return sorted(s for s in self.seen if not is_loopback(s[2]))

    def names(self) -> set[str]:
        return {s[1] for s in self.seen}

"""Which sockets the Ray processes of this test run listen on."""

from __future__ import annotations

import os
import threading

import psutil

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def ray_pids() -> set[int]:
    """This process (the driver) and every process it started: the local Ray's gcs_server, raylet, and the workers
    the raylet starts. (Other Ray instances on the machine are not descendants and are not looked at.)"""
    me = psutil.Process(os.getpid())
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def listeners() -> set[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket and bound UDP socket of Ray's processes."""
    pids = ray_pids()
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # SOCK_DGRAM bound
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            found.add((c.pid, name, c.laddr.ip, c.laddr.port))
    return found


class ListenerWatch:
    """Polls ``listeners()`` in a thread while a block runs; ``seen`` collects everything observed."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.seen: set[tuple[int, str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= listeners()
            self._stop.wait(self.interval)

    def __enter__(self) -> ListenerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seen |= listeners()

    def not_loopback(self) -> list[tuple[int, str, str, int]]:
        return sorted(s for s in self.seen if s[2] not in LOOPBACK)

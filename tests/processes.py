"""Processes a test started (a ``stylid`` driver and the local Ray under it), watched and ended by PID."""

from __future__ import annotations

import contextlib

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every process under it (its local Ray: GCS, raylet, the raylet's workers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def note_tree(pid: int, seen: dict[int, psutil.Process]) -> None:
    """Add ``pid``'s tree to ``seen`` (by PID); nothing if ``pid`` is gone. A run's processes come and go, so a
    test notes the tree as the run goes, to end every one of them later."""
    with contextlib.suppress(psutil.Error):
        for p in process_tree(pid):
            seen.setdefault(p.pid, p)


def alive(p: psutil.Process) -> bool:
    """``p`` runs (a zombie does not)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_and_wait(procs: list[psutil.Process], timeout: float = 20) -> None:
    """SIGKILL what is left of ``procs`` (started by this test) and wait up to ``timeout`` s for them to end."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)

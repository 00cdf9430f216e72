"""Ending every process of the local Ray that stylid started, even when the driver is killed.

``ray.init()`` starts a GCS, a raylet, log and autoscaler monitors, a dashboard and a runtime-env agent, and the
worker processes. On a normal exit ``ray.shutdown()`` ends them. When the driver is killed (SIGKILL, OOM killer),
the raylet and the workers go, but the dashboard and runtime-env agents stay, orphaned and ignoring SIGTERM (Ray
2.60: their raylet-death handler waits on the dead GCS). ``start_watchdog`` guards a session: a small process
(no Ray import) that notices the driver's end and kills what is left of that session, SIGTERM then SIGKILL.

A process belongs to the session when it carries the session's token (``STYLID_LOCAL_RAY`` in its environment:
``init_ray`` sets it only while ``ray.init()`` starts the node, so the GCS, the raylet and every worker the raylet
starts inherit it, and nothing the driver starts later does), or descends from such a process. The agents rewrite
their environment block with their process title, so the watchdog records (pid, start time) of every member while
the driver lives, and at the end also takes Ray processes that hold a file of the session's folder open. Nothing
else is ever signalled: not another stylid's Ray, not a cluster that stylid joined (no watchdog then).

``reap_orphaned_sessions`` is the fallback for a watchdog that was killed with its driver (a whole process group
SIGKILLed): the next local start ends the leftovers of sessions whose driver is gone, found by their record
(owner pid and start time, token, session folder) in ``<ray temp dir>/stylid-sessions/``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass

import psutil

TOKEN_ENV = "STYLID_LOCAL_RAY"
#: seconds between SIGTERM and SIGKILL
GRACE_S = 3.0
#: seconds between two looks at the driver and its Ray processes
POLL_S = 0.5


@dataclass
class SessionRecord:
    """What identifies one local Ray session started by stylid."""

    token: str
    owner_pid: int
    owner_started: float  # psutil create_time of the driver: a reused pid is another process
    session_dir: str = ""

    def owner_alive(self) -> bool:
        try:
            p = psutil.Process(self.owner_pid)
            return abs(p.create_time() - self.owner_started) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def new_record() -> SessionRecord:
    """A record for a session about to be started by this process."""
    me = psutil.Process()
    return SessionRecord(token=f"{me.pid}-{uuid.uuid4().hex}", owner_pid=me.pid, owner_started=me.create_time())


def _key(p: psutil.Process) -> tuple[int, float] | None:
    try:
        return p.pid, p.create_time()
    except psutil.Error:
        return None


def _has_token(p: psutil.Process, token: str) -> bool:
    try:
        return p.environ().get(TOKEN_ENV) == token
    except psutil.Error:
        return False


def _is_ray_process(p: psutil.Process) -> bool:
    try:
        name = p.name()
        cmd = " ".join(p.cmdline()[:2])
    except psutil.Error:
        return False
    return name.startswith(("ray::", "raylet", "gcs_server")) or "ray::" in cmd or "/ray/" in cmd


def _holds_file_under(p: psutil.Process, folder: str) -> bool:
    if not folder:
        return False
    prefix = folder.rstrip("/") + "/"
    try:
        return any(f.path.startswith(prefix) for f in p.open_files())
    except psutil.Error:
        return False


def members(record: SessionRecord, roots: list[psutil.Process] | None = None) -> list[psutil.Process]:
    """The live processes of the session: token holders among ``roots``' descendants (all processes when
    ``roots`` is None) and everything below them; plus Ray processes holding a file of the session folder."""
    me = os.getpid()
    if roots is None:
        candidates = list(psutil.process_iter())
    else:
        candidates = []
        for r in roots:
            try:
                candidates += r.children(recursive=True)
            except psutil.Error:
                continue
    found: dict[int, psutil.Process] = {}
    for p in candidates:
        if p.pid in (me, record.owner_pid) or p.pid in found:
            continue
        if _has_token(p, record.token) or (
            record.session_dir and _is_ray_process(p) and _holds_file_under(p, record.session_dir)
        ):
            found[p.pid] = p
            try:
                for c in p.children(recursive=True):
                    if c.pid != me:
                        found.setdefault(c.pid, c)
            except psutil.Error:
                pass
    return list(found.values())


def reap(processes: list[psutil.Process], grace: float = GRACE_S) -> int:
    """SIGTERM ``processes``, SIGKILL those still there after ``grace`` seconds; returns how many were alive."""
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                p.terminate()
                alive.append(p)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=grace)
    return len(alive)


def _records_dir(temp_dir: str) -> str:
    return os.path.join(temp_dir, "stylid-sessions")


def save_record(record: SessionRecord, temp_dir: str) -> str:
    """Write the session's record (so a later start can clean up after a watchdog that died too)."""
    folder = _records_dir(temp_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{record.token}.json")
    with open(path, "w") as f:
        json.dump(asdict(record), f)
    return path


def reap_orphaned_sessions(temp_dir: str) -> int:
    """End what is left of earlier stylid sessions whose driver is gone; returns the number of processes ended."""
    folder = _records_dir(temp_dir)
    if not os.path.isdir(folder):
        return 0
    ended = 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                record = SessionRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if record.owner_alive():
            continue
        ended += reap(members(record))
        try:
            os.remove(path)
        except OSError:
            pass
    return ended


def watch(record: SessionRecord, record_path: str = "") -> None:
    """The watchdog's loop: while the driver lives (and keeps our stdin open), remember the session's processes;
    then end those still alive and remove the session's record."""
    known: dict[tuple[int, float], psutil.Process] = {}
    try:
        owner = psutil.Process(record.owner_pid)
    except psutil.Error:
        owner = None
    while owner is not None and record.owner_alive():
        for p in members(record, roots=[owner]):
            key = _key(p)
            if key:
                known[key] = p
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready:
            data = sys.stdin.buffer.read1(4096)
            if not data:
                break  # the driver closed its end: it is exiting
            lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
            if lines:  # the driver tells the session folder once Ray is up
                record.session_dir = lines[-1].strip()
    if owner is not None:  # an exiting driver is shutting Ray down itself: give it a moment
        try:
            owner.wait(timeout=GRACE_S)
        except psutil.Error:
            pass
    leftovers = {p.pid: p for p in known.values() if p.is_running()}  # is_running: false for a reused pid
    for p in members(record):
        leftovers.setdefault(p.pid, p)
    reap(list(leftovers.values()))
    if record_path:
        try:
            os.remove(record_path)
        except OSError:
            pass


def start_watchdog(record: SessionRecord, record_path: str = "") -> subprocess.Popen:
    """Start the watchdog process for ``record`` (in its own session, so a signal to the driver's process group
    does not end it before it has cleaned up). It holds no token and imports only psutil."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.ray_reaper", json.dumps(asdict(record)), record_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def tell_session_dir(watchdog: subprocess.Popen, session_dir: str) -> None:
    """Tell a running watchdog the session's folder (known only once ``ray.init`` has returned)."""
    if session_dir and watchdog.stdin is not None:
        try:
            watchdog.stdin.write(session_dir.encode() + b"\n")
            watchdog.stdin.flush()
        except OSError:  # a watchdog that died: the next start's sweep (by the saved record) stands in for it
            pass


def _main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not stop the cleanup
    record = SessionRecord(**json.loads(argv[0]))
    watch(record, argv[1] if len(argv) > 1 else "")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

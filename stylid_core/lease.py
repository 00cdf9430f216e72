"""One writer per output: a lease object ``<output>/_writer.json`` held while a job writes rows there.

Two runs into one output each planned the same pending rows and wrote them all: every row twice in the ledger.
A job now takes the lease before it plans (``pipelines.runner.process_pending``) and gives it back when its
rows are written; a second job finds it held and stops in one line (``LeaseHeld``, exit 2).

Object stores have no portable create-if-absent, so taking the lease is: read it (held and alive: refuse), write
this job's record, wait ``settle_s``, read it again (another job's record there: that job wrote last and holds
it; refuse). Two jobs starting within the same moment therefore end with one holder. The holder rewrites its
record every ``heartbeat_s`` seconds; a record not rewritten for ``ttl_s`` seconds, or one of a process of this
host that is gone (a ``kill -9``), is stale and is taken over, so a crash never locks an output for good.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from stylid_core.config import ConfigError
from stylid_core.storage import delete, join, read_bytes, write_bytes

log = logging.getLogger(__name__)

LEASE = "_writer.json"
TTL_S = 120.0
HEARTBEAT_S = 20.0
SETTLE_S = 0.5


class LeaseHeld(ConfigError):
    """Another job holds the output's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class OutputLease:
    """The writer lease of ``output_uri``; a context manager (``acquire`` on entry, ``release`` on exit)."""

    def __init__(
        self,
        output_uri: str,
        storage_options: dict | None = None,
        ttl_s: float = TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        settle_s: float = SETTLE_S,
    ) -> None:
        self.uri = join(output_uri, LEASE)
        self.output_uri = output_uri
        self.storage_options = storage_options
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                "heartbeat": time.time()}  # fmt: skip

    def _read(self) -> dict | None:
        try:
            record = json.loads(read_bytes(self.uri, self.storage_options))
        except Exception:  # absent (no holder), or unreadable: a torn record is no lease
            return None
        return record if isinstance(record, dict) else None

    def is_live(self, record: dict) -> bool:
        """Whether ``record`` is a lease still held: rewritten within ``ttl_s``, and not of a dead process here."""
        try:
            if time.time() - float(record["heartbeat"]) > self.ttl_s:
                return False
            if record.get("host") == socket.gethostname() and not _pid_alive(int(record["pid"])):
                return False
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def _refuse(self, record: dict) -> LeaseHeld:
        seen = time.time() - float(record.get("heartbeat", 0))
        return LeaseHeld(
            f"{self.output_uri} is being written by another run (pid {record.get('pid')} on {record.get('host')},"
            f" last seen {seen:.0f} s ago); two runs into one output would write every row twice. Wait for it, or"
            f" remove {self.uri} if that run is gone (a lease not renewed for {self.ttl_s:g} s expires)"
        )

    def acquire(self) -> None:
        current = self._read()
        if current is not None and current.get("token") != self.token and self.is_live(current):
            raise self._refuse(current)
        if current is not None and current.get("token") != self.token:
            log.warning("taking over the stale writer lease %s (pid %s on %s)", self.uri, current.get("pid"),
                        current.get("host"))  # fmt: skip
        write_bytes(self.uri, json.dumps(self._record()).encode(), self.storage_options)
        time.sleep(self.settle_s)
        again = self._read()
        if again is None or again.get("token") != self.token:  # another job wrote after this one: it holds it
            raise self._refuse(again or current or {})
        self._thread = threading.Thread(target=self._renew, name="stylid-writer-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                write_bytes(self.uri, json.dumps(self._record()).encode(), self.storage_options)
            except Exception as exc:  # a storage hiccup: the next renewal tries again, well within the TTL
                log.warning("could not renew the writer lease %s: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = self._read()
        if current is not None and current.get("token") == self.token:
            try:
                delete(self.uri, self.storage_options)
            except Exception as exc:  # left behind: it expires after the TTL, or is taken over by a rerun here
                log.warning("could not remove the writer lease %s: %s", self.uri, exc)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

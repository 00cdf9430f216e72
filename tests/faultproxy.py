"""A fault-injecting HTTP proxy for an S3 endpoint (moto's server) on 127.0.0.1, for tests and benchmarks.

It forwards every request to the target, except that a share of them (chosen by a seeded hash of the request's
number, so a run is reproducible) is answered ``503 ServiceUnavailable`` without reaching the target, and another
share is held for ``delay_s`` before being forwarded (past the client's timeout, the client sees a timeout). It is
bounded: it stops injecting after ``max_faults``, answers 503 to everything and shuts down after ``max_requests``
requests, and shuts down by itself after ``lifetime_s`` seconds, so a test that hangs never leaves it behind.

    with FaultProxy("http://127.0.0.1:5000", fail_share=0.05) as proxy:
        ...  # point the S3 client at proxy.url
        proxy.stats()  # {"requests": ..., "failed": ..., "delayed": ...}

``python -m tests.faultproxy TARGET --fail-share 0.05`` runs one in its own process (it prints its URL).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service Unavailable (injected by FaultProxy)</Message></Error>"
)
#: request headers not passed on (hop-by-hop, or rewritten by the forwarding connection)
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect"}


class FaultProxy:
    """See the module docstring. ``paths``: only requests whose path contains one of these substrings are
    candidates for faults (all requests when empty)."""

    def __init__(
        self,
        target: str,
        fail_share: float = 0.0,
        delay_share: float = 0.0,
        delay_s: float = 0.0,
        seed: int = 0,
        paths: tuple[str, ...] = (),
        max_faults: int = 10_000,
        max_requests: int = 200_000,
        lifetime_s: float = 900.0,
    ) -> None:
        if not 0 <= fail_share + delay_share <= 1:
            raise ValueError("fail_share + delay_share must be in [0, 1]")
        parsed = urllib.parse.urlparse(target)
        self.target_host, self.target_port = parsed.hostname, parsed.port or 80
        self.fail_share, self.delay_share, self.delay_s = fail_share, delay_share, delay_s
        self.seed, self.paths = seed, tuple(paths)
        self.max_faults, self.max_requests, self.lifetime_s = max_faults, max_requests, lifetime_s
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "failed": 0, "delayed": 0}
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- decisions -------------------------------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            self._counts["requests"] += 1
            n = self._counts["requests"]
            if n > self.max_requests:
                return "spent"
            faults = self._counts["failed"] + self._counts["delayed"]
            what = "pass"
            if faults < self.max_faults and (not self.paths or any(p in path for p in self.paths)):
                u = int.from_bytes(hashlib.sha256(f"{self.seed}:{n}".encode()).digest()[:8], "big") / 2**64
                if u < self.fail_share:
                    what = "fail"
                elif u < self.fail_share + self.delay_share:
                    what = "delay"
            if what == "fail":
                self._counts["failed"] += 1
            elif what == "delay":
                self._counts["delayed"] += 1
            self.log.append((method, path, what))
            return what

    def stats(self) -> dict[str, int]:
        """Requests seen, answered 503, and delayed, so far."""
        with self._lock:
            return dict(self._counts)

    # -- server ----------------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, length: str | None = None):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                # a HEAD answer carries the length of the body a GET would get
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _any(self) -> None:
                body = self._body()
                what = proxy._decide(self.command, self.path)
                if what == "spent":
                    self._answer(503, [("Content-Type", "application/xml")], _ERROR_BODY)
                    threading.Thread(target=proxy.stop, daemon=True).start()
                    return
                if what == "fail":
                    self._answer(503, [("Content-Type", "application/xml")], _ERROR_BODY)
                    return
                if what == "delay":
                    time.sleep(proxy.delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP | {"content-length"}]
                    head_length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self._answer(resp.status, out, data, head_length)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) while the request was held
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler

    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1, serving from a background thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """Run a proxy in this process until its lifetime ends (prints its URL, then its counts at the end)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("--fail-share", type=float, default=0.05)
    p.add_argument("--delay-share", type=float, default=0.0)
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lifetime-s", type=float, default=900.0)
    args = p.parse_args()
    proxy = FaultProxy(args.target, args.fail_share, args.delay_share, args.delay_s, args.seed,
                       lifetime_s=args.lifetime_s).start()  # fmt: skip
    print(proxy.url, flush=True)
    end = time.time() + args.lifetime_s
    while time.time() < end and proxy._server is not None:
        time.sleep(0.5)
    print(proxy.stats(), flush=True)


if __name__ == "__main__":
    main()

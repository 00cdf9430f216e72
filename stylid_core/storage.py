"""Object storage through fsspec: every path is a URI (local path, ``file://``, ``s3://``, ``gs://``, ...).

S3-compatible endpoints (MinIO, moto, cloud) are reached through the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or through
``storage_options`` from the config, which fsspec passes to the filesystem (e.g. ``{"endpoint_url": ...}``).

Every read and write retries transient failures (HTTP 500/502/503/504, SlowDown, timeouts, dropped connections)
with bounded exponential backoff (``RetryPolicy``); permanent ones (404, 403, a directory, a bad URI) fail at once,
so a row gets its ``missing``/``forbidden`` status without waiting. On S3 the request timeouts come from the policy
and botocore's own retries are off unless ``storage_options`` set them: one retry layer, here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import random
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """A read that failed; ``status`` is the row status it maps to (missing, forbidden, read_error, unsupported:
    a URI scheme no installed filesystem serves)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """How storage calls retry transient failures: ``attempts`` tries in all, sleeping a random time up to
    ``backoff_s * 2**k`` (capped at ``max_backoff_s``) before try ``k + 1``; ``timeout_s`` bounds each S3 request
    (connect and read), so a stalled request becomes a retried timeout instead of a hung worker."""

    attempts: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"bad retry policy {self}: attempts >= 1, backoffs >= 0 and timeout_s > 0")

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed try number ``attempt`` (0-based): full jitter, bounded."""
        return random.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2**attempt))


DEFAULT_RETRY = RetryPolicy()

#: exception class names (anywhere in the MRO) of transient transport failures: botocore, aiohttp, fsspec, http
_TRANSIENT_TYPES = frozenset({
    "HTTPClientError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "FSTimeoutError",
    "IncompleteRead", "ResponseParserError", "TimeoutError", "ConnectionError", "RemoteDisconnected",
})  # fmt: skip
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                               errno.ECONNABORTED, errno.EPIPE})  # fmt: skip
#: what S3 says for a server-side failure worth retrying (s3fs turns them into OSError with this text)
_TRANSIENT_WORDS = ("ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "Service Unavailable",
                    "Bad Gateway", "Gateway Timeout", "(500)", "(502)", "(503)", "(504)", "timed out")  # fmt: skip
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that may pass on a retry (5xx, throttling, timeouts, dropped connections);
    not found, access denied and bad requests are permanent."""
    if _connection_failure(exc) is not None:
        return True
    if isinstance(exc, (StorageError, *_PERMANENT)):
        return False
    if _TRANSIENT_TYPES & {c.__name__ for c in type(exc).__mro__}:
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(exc)
    return isinstance(exc, OSError) and any(w in text for w in _TRANSIENT_WORDS)


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The transient error behind a ``FileNotFoundError`` that is none (fsspec's HTTP filesystem reports a refused
    or dropped connection as not found, raised from the connection error), else None."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and not isinstance(cause, _PERMANENT):
        return cause if is_transient(cause) else None
    return None


def with_retries(call: Callable[[], T], what: str, retry: RetryPolicy | None = None) -> T:
    """``call()``, tried again after a transient failure (``is_transient``) up to ``retry.attempts`` times in all,
    with backoff; the last failure, or the first permanent one, is raised as it came."""
    retry = retry or DEFAULT_RETRY
    for attempt in range(retry.attempts):
        try:
            return call()
        except Exception as exc:
            if attempt + 1 >= retry.attempts or not is_transient(exc):
                raise
            pause = retry.delay(attempt)
            log.info("%s: transient %s (%s); try %d of %d in %.2f s", what, type(exc).__name__, exc, attempt + 2,
                     retry.attempts, pause)  # fmt: skip
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _options_for(uri: str, storage_options: dict[str, Any] | None, retry: RetryPolicy | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a") and "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        # s3fs reads AWS_ENDPOINT_URL through botocore too; passing it explicitly also covers older versions
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if protocol in ("s3", "s3a"):
        retry = retry or DEFAULT_RETRY
        config_kwargs = dict(opts.get("config_kwargs") or {})
        config_kwargs.setdefault("connect_timeout", retry.timeout_s)
        config_kwargs.setdefault("read_timeout", retry.timeout_s)
        config_kwargs.setdefault("retries", {"max_attempts": 1})  # ``with_retries`` is the retry layer
        opts["config_kwargs"] = config_kwargs
    else:
        opts.pop("endpoint_url", None)
    return opts


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it (S3 request timeouts from ``retry``)."""
    return url_to_fs(uri, **_options_for(uri, storage_options, retry))


def local_path(uri: str) -> str | None:
    """The OS path of a plain local ``uri`` (no protocol, no fsspec chain), else None. Such files are read and
    written with ``open`` directly: fsspec's URL parsing costs about as much as reading a small image."""
    if "://" in uri or "::" in uri:
        return None
    return os.path.expanduser(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' (URIs are not OS paths)."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _read_local_file(path: str, uri: str, max_bytes: int | None) -> bytes:
    """The bytes of the local regular file ``path``, read to at most ``max_bytes`` (counted as read, not as the
    size the file reports). A FIFO, socket or device is refused before any read: it is opened non-blocking (so a
    FIFO with no writer does not hang the open) and its type checked on the open descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with open(fd, "rb", closefd=True) as f:
        info = os.fstat(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if not stat.S_ISREG(mode):
            raise StorageError("missing", f"{uri}: not a regular file ({_file_kind(mode)}); refused unread")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        if max_bytes is None:
            return f.read()
        if info.st_size > max_bytes:  # refused unread; a file that grows is still cut at max_bytes + 1 below
            raise StorageError("too_large", f"{uri}: {info.st_size} bytes exceeds the limit of {max_bytes}")
        data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise StorageError("too_large", f"{uri}: more than {max_bytes} bytes, the limit")
        return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _storage_error(uri: str, exc: BaseException, other: str, retry: RetryPolicy | None) -> StorageError:
    """``exc`` (raised for ``uri``) as a ``StorageError`` whose message names the URI and whose status is the row
    status it maps to (``other`` for anything that is not not-found or access-denied)."""
    if isinstance(exc, StorageError):
        return exc
    exc = _connection_failure(exc) or exc  # a refused connection is a read error, retried, not a missing file
    cause = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        return StorageError("missing", f"{uri}: not found ({exc})")
    if isinstance(exc, PermissionError):
        return StorageError("forbidden", f"{uri}: access denied ({exc})")
    if isinstance(exc, IsADirectoryError):
        return StorageError("missing", f"{uri}: is a directory, not a file")
    if isinstance(exc, ImportError) or (isinstance(exc, ValueError) and "Protocol not known" in str(exc)):
        # gs://, az://, hdfs:// ... with no fsspec implementation installed here: permanent, never retried
        scheme = uri.split("://", 1)[0] if "://" in uri else "?"
        return StorageError("unsupported", f"{uri}: no storage for {scheme}:// here ({cause})")
    if is_transient(exc):
        cause += f" (still failing after {(retry or DEFAULT_RETRY).attempts} tries)"
    return StorageError(other, f"{uri}: {cause}")


def read_bytes(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    max_bytes: int | None = None,
    retry: RetryPolicy | None = None,
) -> bytes:
    """The bytes of ``uri``; transient failures are retried (``retry``), and what still fails raises
    ``StorageError`` with a row status (``missing``, ``forbidden``, ``too_large``, ``read_error``) and the URI."""

    def too_large(size: int | str) -> StorageError:
        return StorageError("too_large", f"{uri}: {size} bytes exceeds the limit of {max_bytes}")

    def read() -> bytes:
        local = local_path(uri)
        fs = None
        if local is None:
            fs, local = filesystem(uri, storage_options, retry)
            if not _is_local(fs):
                if max_bytes is None:
                    return fs.cat_file(local)
                size = fs.size(local)
                if size is not None and size > max_bytes:
                    raise too_large(size)
                if size == 0:  # S3 answers a range read of an empty object with 416 InvalidRange
                    with fs.open(local, "rb") as f:
                        data = f.read(max_bytes + 1)  # still bounded, should the reported size be wrong
                    if len(data) > max_bytes:
                        raise too_large(f"more than {max_bytes}")
                    return data
                # a range read: a server that reports a wrong size still sends at most max_bytes + 1
                data = fs.cat_file(local, start=0, end=max_bytes + 1)
                if len(data) > max_bytes:
                    raise too_large(f"more than {max_bytes}")
                return data
        return _read_local_file(local, uri, max_bytes)

    try:
        return with_retries(read, f"read {uri}", retry)
    except Exception as exc:  # network errors, bad URIs, unknown protocols included
        raise _storage_error(uri, exc, "read_error", retry) from None


def write_bytes(
    uri: str, data: bytes, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> None:
    """Write ``data`` to ``uri`` so that it is never visible half-written; transient failures are retried.

    Object stores get one put; local files are written beside the target (a hidden ``.<name>.tmp-*``) and renamed
    over it. What still fails raises ``StorageError`` (``forbidden``, ``missing`` for a missing bucket, else
    ``write_error``) naming the URI.
    """

    def write() -> None:
        path = local_path(uri)
        fs = None
        if path is None:
            fs, path = filesystem(uri, storage_options, retry)
        if fs is None or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            folder, name = os.path.split(path)
            os.makedirs(folder or ".", exist_ok=True)
            tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.pipe_file(path, data)

    try:
        with_retries(write, f"write {uri}", retry)
    except Exception as exc:
        raise _storage_error(uri, exc, "write_error", retry) from None


def exists(uri: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> bool:
    """Whether ``uri`` exists (transient failures retried)."""
    fs, path = filesystem(uri, storage_options, retry)
    return with_retries(lambda: fs.exists(path), f"exists {uri}", retry)


def list_files(
    uri: str, suffix: str = "", storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> list[str]:
    """Full URIs of the files directly under ``uri`` ending in ``suffix`` (empty when the folder is missing)."""
    fs, path = filesystem(uri, storage_options, retry)

    def ls() -> list[str]:
        try:
            return fs.ls(path, detail=False, refresh=True) if fs.exists(path) else []
        except FileNotFoundError:
            return []

    entries = with_retries(ls, f"list {uri}", retry)
    base = uri.rstrip("/")
    names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
    return [join(base, n) for n in names if n.endswith(suffix) and not n.startswith(".")]


def delete(uri: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> None:
    """Remove the object at ``uri`` if it exists (transient failures retried)."""
    fs, path = filesystem(uri, storage_options, retry)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path)

    with_retries(rm, f"delete {uri}", retry)


def arrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """A pyarrow filesystem (over fsspec) and path for ``uri``; ``None`` for local paths (pyarrow's own)."""
    import pyarrow.fs

    fs, path = filesystem(uri, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None, path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a local file, read in 1 MiB chunks (model files checked at load)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

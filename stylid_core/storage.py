"""Object storage through fsspec: every path is a URI (local path, ``file://``, ``s3://``, ``gs://``, ...).

S3-compatible endpoints (MinIO, moto, cloud) are reached through the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or through
``storage_options`` from the config, which fsspec passes to the filesystem (e.g. ``{"endpoint_url": ...}``).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
import pandas as pd
import pyarrow.parquet as pq
from fsspec.core import url_to_fs


class StorageError(OSError):
    """A read that failed; ``status`` is the row status it maps to (missing, forbidden, read_error)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a") and "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        # s3fs reads AWS_ENDPOINT_URL through botocore too; passing it explicitly also covers older versions
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if protocol not in ("s3", "s3a"):
        opts.pop("endpoint_url", None)
    return opts


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it."""
    return url_to_fs(uri, **_options_for(uri, storage_options))


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' (URIs are not OS paths)."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of ``uri``; failures raise ``StorageError`` with a row status."""
    try:
        fs, path = filesystem(uri, storage_options)
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise StorageError("too_large", f"{size} bytes exceeds the limit of {max_bytes}")
        return fs.cat_file(path)
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError("missing", f"not found: {uri} ({exc})") from None
    except PermissionError as exc:
        raise StorageError("forbidden", f"access denied: {uri} ({exc})") from None
    except IsADirectoryError:
        raise StorageError("missing", f"is a directory, not a file: {uri}") from None
    except Exception as exc:  # network errors, bad URIs, unknown protocols
        raise StorageError("read_error", f"{type(exc).__name__}: {exc}") from None


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` so that it is never visible half-written.

    Object stores get one put; local files are written beside the target and renamed over it.
    """
    fs, path = filesystem(uri, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def list_files(uri: str, suffix: str = "", storage_options: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the files directly under ``uri`` ending in ``suffix`` (empty when the folder is missing)."""
    fs, path = filesystem(uri, storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if fs.exists(path) else []
    except FileNotFoundError:
        return []
    base = uri.rstrip("/")
    names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
    return [join(base, n) for n in names if n.endswith(suffix) and not n.startswith(".")]


def delete(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path)


def read_parquet_dir(uri: str, storage_options: dict[str, Any] | None = None, columns=None) -> pd.DataFrame:
    """All rows of the Parquet files directly under ``uri``, as one frame (empty when there are none)."""
    files = list_files(uri, ".parquet", storage_options)
    if not files:
        return pd.DataFrame(columns=columns or [])
    fs, _ = filesystem(uri, storage_options)
    frames = []
    for file_uri in files:
        _, path = filesystem(file_uri, storage_options)
        with fs.open(path, "rb") as f:
            frames.append(pq.read_table(f, columns=columns).to_pandas())
    return pd.concat(frames, ignore_index=True)


def arrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """A pyarrow filesystem (over fsspec) and path for ``uri``; ``None`` for local paths (pyarrow's own)."""
    import pyarrow.fs

    fs, path = filesystem(uri, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None, path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path

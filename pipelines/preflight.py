"""Checks run on the driver before Ray starts and before any model loads: fail fast, and say what.

A job whose manifest cannot be read, whose output cannot be written or whose style image cannot be decoded would
otherwise fail only after Ray's start-up and the first batch's model work, with a long Ray traceback that does not
name the URI at fault. Here each problem is one ``PreflightError`` (a ``ConfigError``, so the CLI prints it on one
line and exits with status 2) naming the URI and the cause:

- the manifest: readable, the required column there, ids unique (``pipelines.manifest.ManifestReader`` and
  ``pipelines.customize.iter_customize_manifest``, the very readers the jobs use);
- the output: a probe object written and deleted under it (a missing bucket, a policy denying ``PutObject`` or
  ``DeleteObject``, a read-only folder all show here);
- the style images (``stylid run``): every distinct style the rows use, up to ``MAX_STYLES_CHECKED``, read and
  decoded (the rest are still checked per row in the stream, failing as ``style_error`` rows).
"""

from __future__ import annotations

import uuid

from stylid_core.config import ConfigError, IOConfig, JobConfig
from stylid_core.imageio import ImageDecodeError, decode_image_bounded
from stylid_core.sample_data import default_style_path
from stylid_core.storage import StorageError, delete, join, read_bytes, write_bytes

#: distinct style images checked up front (a dataset usually has a handful; more are checked in the stream)
MAX_STYLES_CHECKED = 64
#: name prefix of the write probe (deleted again at once; a leftover one means the delete failed)
PROBE_PREFIX = "_stylid_write_probe-"


class PreflightError(ConfigError):
    """An input or output that cannot work, found before the job starts; its message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _naming(uri: str, exc: BaseException) -> str:
    """``exc``'s message, prefixed with ``uri`` unless it names it already."""
    text = str(exc)
    return text if uri in text else f"{uri}: {text}"


def check_output(output_uri: str, io: IOConfig) -> None:
    """Write a small probe object under ``output_uri`` and delete it; ``PreflightError`` if either fails."""
    probe = join(output_uri, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"stylid write probe\n", io.storage_options, io.retry)
    except StorageError as exc:
        raise PreflightError(f"output {output_uri} is not writable ({exc.status}): {exc}") from None
    try:
        delete(probe, io.storage_options, io.retry)
    except Exception as exc:
        raise PreflightError(
            f"output {output_uri} accepts writes but not deletes (resume needs both): {_naming(probe, exc)}"
        ) from None


def check_style_images(uris, io: IOConfig) -> None:
    """Read and decode each distinct style image among ``uris`` (at most ``MAX_STYLES_CHECKED``)."""
    seen = list(dict.fromkeys(u for u in uris if isinstance(u, str) and u))[:MAX_STYLES_CHECKED]
    for uri in seen:
        try:
            data = read_bytes(uri, io.storage_options, io.max_bytes, io.retry)
            decode_image_bounded(data, io.max_pixels, io.max_bytes, io.max_work_pixels, uri)
        except (StorageError, ImageDecodeError) as exc:
            raise PreflightError(f"style image cannot be used ({exc.status}): {_naming(uri, exc)}") from None


def _manifest(read, manifest_uri: str):
    try:
        return read()
    except PreflightError:
        raise
    except ValueError as exc:  # the manifest reader's own messages name the manifest
        raise PreflightError(_naming(manifest_uri, exc)) from None


def manifest_styles(reader, limit: int = MAX_STYLES_CHECKED) -> list[str]:
    """Up to ``limit`` distinct style URIs of the manifest's ``ok`` rows, in one streamed pass (``ManifestReader``
    batches: the driver never holds the whole manifest)."""
    import pyarrow.compute as pc

    seen: dict[str, None] = {}
    for table in reader:
        ok = pc.equal(table.column("status"), "ok")
        styles = pc.unique(table.column("style_uri").filter(ok).cast("string")).to_pylist()
        seen.update(dict.fromkeys(u for u in styles if u))
        if len(seen) >= limit:
            break
    return list(seen)[:limit]


def preflight_run(config: JobConfig, manifest_uri: str | None, output_uri: str) -> None:
    """Everything ``stylid run`` can check before Ray: the manifest (when given; the bundled sample needs none:
    readable, ``image_uri`` there, ids unique, through the reader the job uses), the output, and the style images
    the rows use."""
    from pipelines.manifest import ManifestReader

    io = config.io
    if manifest_uri:

        def read() -> list[str]:
            reader = ManifestReader(manifest_uri, config.stylize.style_uri, io.storage_options)
            reader.scan_ids()  # one pass over the ids: ValueError naming duplicates
            return manifest_styles(reader)

        styles = _manifest(read, manifest_uri)
    else:
        styles = [config.stylize.style_uri or default_style_path()]
    check_output(output_uri, io)
    check_style_images(styles, io)


def preflight_customize(config, manifest_uri: str, output_uri: str) -> None:
    """Everything ``stylid customize`` can check before Ray: its manifest and the output."""
    from pipelines.customize import iter_customize_manifest

    # the job's reader, one streamed pass over the ids: ValueError naming duplicates
    _manifest(lambda: iter_customize_manifest(manifest_uri, config).scan_ids(), manifest_uri)
    check_output(output_uri, config.io)

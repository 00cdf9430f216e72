"""One output lifecycle for every job that writes (``stylid run``, ``score``, ``customize``).

``open_output`` starts a job's run into an output: the config check (``check_output_config``: an output of
another config or metrics version is refused; ``--overwrite`` removes the previous run, under the output's
writer lease), ``_SUCCESS`` (and the job's own files of the last run, e.g. ``gate.json``) removed, the start time
taken. ``close_output`` ends it: ``run.json`` (``job``, ``metrics_version``, ``config``, ``config_hash``,
``versions``, ``started``, ``finished`` and what the job adds), then the report, then ``_SUCCESS``, always last:
an output with ``_SUCCESS`` has its ``run.json`` and report."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import platform
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stylid_core.config import ConfigError
from stylid_core.lease import OutputLease
from stylid_core.ledger import METRICS, iter_shards
from stylid_core.metrics import METRICS_VERSION
from stylid_core.secrets import redact, scrub, secret_values
from stylid_core.storage import delete, exists, filesystem, join, read_bytes, write_bytes

log = logging.getLogger(__name__)

_VERSIONED = ("stylid", "ray", "torch", "diffusers", "transformers", "dlib-bin", "insightface", "onnxruntime",
              "opencv-python-headless", "pyarrow", "pandas", "numpy", "fsspec", "s3fs")  # fmt: skip

#: the config hash (and metrics version, job) of the rows under an output, written before its first row
#: (``run.json`` comes only at the end: after a crash, a rerun with another config would otherwise mix two
#: configs' rows silently)
CONFIG_RECORD = "_config.json"
SUCCESS = "_SUCCESS"
RUN_JSON = "run.json"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def versions() -> dict[str, str]:
    """The versions of Python and of the packages that change results, for ``run.json``."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def config_record(config: Any) -> dict[str, Any]:
    """``config.to_dict()`` for ``run.json``, secret-named values redacted: ``io.storage_options`` stays, as given
    (an endpoint, a region, a profile say where the run read and wrote), its credentials ``<redacted>``; and
    ``write_run_json`` scrubs any known secret value wherever else it appears."""
    return redact(config.to_dict())


def _read_record(output_uri: str, name: str, storage_options: dict) -> dict | None:
    try:
        record = json.loads(read_bytes(join(output_uri, name), storage_options))
    except Exception:  # absent (a new output) or unreadable: nothing recorded
        return None
    return record if isinstance(record, dict) else None


def _recorded_hash(output_uri: str, name: str, storage_options: dict) -> str | None:
    return (_read_record(output_uri, name, storage_options) or {}).get("config_hash")


def _record_config(output_uri: str, config_hash: str, storage_options: dict, job: str | None = None) -> None:
    record = {"config_hash": config_hash, "metrics_version": METRICS_VERSION, "job": job, "recorded": now()}
    write_bytes(join(output_uri, CONFIG_RECORD), json.dumps(record).encode(), storage_options)


def _version_of(record: dict | None) -> int | None:
    """The metrics version a record names (``run.json`` before versions: 1; a ``_config.json`` of a stylid before
    it recorded one: unknown, ``None``); ``None`` for a customize output (its rows have no scores of these
    kinds) or no record."""
    if record is None or record.get("job") == "customize":
        return None
    if "metrics_version" in record:
        return record["metrics_version"]
    return 1 if "config" in record else None  # a run.json has "config"; an early _config.json has neither


def check_output_config(output_uri: str, config: Any, overwrite: bool, job: str | None = None) -> None:
    """Refuse to mix two configs' (or two metrics versions') rows in one output: the resume ledger would count the
    other's rows.

    ``config`` is any job config with ``config_hash()`` and ``io.storage_options``. With ``overwrite`` the previous
    run is removed, while holding the output's writer lease (``OutputLease``: a run writing there meanwhile is
    refused in one line, ``LeaseHeld``, exit 2, and nothing is removed): the images its metrics list
    (``output_uri``, or the JSON list ``output_uris`` of ``stylid customize``), its ``metrics/`` and ``faces/``
    shards, ``report.html``, ``gate.json``, ``run.json`` and ``_SUCCESS``. Nothing else under the output is touched
    (the bundled sample's inputs, files of the user's). Hash and version are read from ``run.json`` and from
    ``CONFIG_RECORD``, which this check writes before the job writes any row, so a crashed run is checked too."""
    opts = config.io.storage_options
    this = config.config_hash()
    previous = _read_record(output_uri, RUN_JSON, opts)
    recorded = _read_record(output_uri, CONFIG_RECORD, opts)
    started = (recorded or {}).get("config_hash")
    finished = (previous or {}).get("config_hash")
    other = next((h for h in (finished, started) if h and h != this), None)
    version = next((v for v in (_version_of(previous), _version_of(recorded)) if v not in (None, METRICS_VERSION)),
                   None)  # fmt: skip
    if other is None and version is None:
        if started != this or (recorded or {}).get("metrics_version") != METRICS_VERSION:
            _record_config(output_uri, this, opts, job)  # a new output, or one of a version before the record
        return
    if not overwrite:
        what = (f"another config (hash {other}, this one is {this})" if other is not None
                else f"metrics version {version} (this stylid writes {METRICS_VERSION})")  # fmt: skip
        raise ConfigError(
            f"{output_uri} holds a run with {what}; choose another --output, or pass --overwrite to start over there"
        )
    with OutputLease(output_uri, opts):  # another run writing there: refused (LeaseHeld), nothing removed
        images = previous_images(output_uri, opts)
        log.info("--overwrite: removing the previous run (%d images, its metrics and faces shards)", len(images))
        for uri in images:
            delete(uri, opts)
        for sub in ("metrics", "faces"):
            fs, path = filesystem(join(output_uri, sub), opts)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        for name in ("report.html", "gate.json", SUCCESS, RUN_JSON):
            delete(join(output_uri, name), opts)
        _record_config(output_uri, this, opts, job)


def previous_images(output_uri: str, storage_options: dict) -> list[str]:
    """The images of this output that its metrics shards record (both jobs' layouts): for each recorded URI, the
    object of the same name under ``<output_uri>/images/``, so a copied or moved output never reaches back into
    the place it was copied from, and nothing outside ``images/`` is named."""
    uris: set[str] = set()
    for table in iter_shards(output_uri, METRICS, storage_options, ["output_uri", "output_uris"]):
        if "output_uri" in table.column_names:
            uris |= {u for u in table.column("output_uri").to_pylist() if isinstance(u, str) and u}
        if "output_uris" in table.column_names:
            uris |= {u for v in table.column("output_uris").to_pylist() if isinstance(v, str) and v
                     for u in json.loads(v)}  # fmt: skip
    return sorted({join(output_uri, "images", posixpath.basename(u)) for u in uris})


def read_finished_run(
    uri: str, storage_options: dict, role: str, error: type[Exception] = ValueError, kind: str = "stylid output"
) -> dict:
    """The ``run.json`` of a finished output (its ``_SUCCESS`` there), for a command that reads another job's output
    (``role``: "baseline", "dataset"); ``error`` naming the URI when it has no readable run.json or did not finish."""
    try:
        info = json.loads(read_bytes(join(uri, RUN_JSON), storage_options))
    except Exception as exc:
        raise error(f"{role} {uri}: no readable run.json ({exc}); is it a {kind}?") from None
    if not exists(join(uri, SUCCESS), storage_options):
        raise error(f"{role} {uri} has no _SUCCESS: that run did not finish")
    return info


def write_run_json(output_uri: str, info: dict, storage_options: dict) -> None:
    """``<output>/run.json``: ``info`` with credentials redacted (secret-named keys) and scrubbed (any known secret
    value, from the storage options or the environment, wherever it appears in the text). Every job writes its
    run.json through here."""
    text = json.dumps(redact(info), indent=2, default=str)
    write_bytes(join(output_uri, RUN_JSON), scrub(text, secret_values(storage_options)).encode(), storage_options)


def check_writable(output_uri: str, io) -> None:
    """The output's preflight (before Ray starts): a probe object written and deleted under it
    (``pipelines.preflight.check_output``); ``PreflightError``, one line, exit 2."""
    from pipelines.preflight import check_output

    check_output(output_uri, io)


@dataclass
class OpenOutput:
    """A job's run into an output, between ``open_output`` and ``close_output``."""

    job: str
    output_uri: str
    config: Any
    started: str

    @property
    def storage_options(self) -> dict:
        return self.config.io.storage_options

    def record(self) -> dict[str, Any]:
        """What every job's ``run.json`` starts with (also what a gate compares: ``job``, ``metrics_version``,
        ``config``)."""
        return {"job": self.job, "metrics_version": METRICS_VERSION, "config": config_record(self.config)}


def open_output(job: str, config: Any, output_uri: str, overwrite: bool = False, clear: tuple[str, ...] = ()
                ) -> OpenOutput:  # fmt: skip
    """Start ``job``'s run into ``output_uri``: the start time, ``check_output_config`` (with ``overwrite``:
    ``--overwrite``), then ``_SUCCESS`` and the files named in ``clear`` (this job's of the last run) removed, so
    an output without ``_SUCCESS`` is one being written or left by a crash."""
    started = now()
    check_output_config(output_uri, config, overwrite, job)
    for name in (SUCCESS, *clear):
        delete(join(output_uri, name), config.io.storage_options)
    return OpenOutput(job, output_uri, config, started)


def close_output(
    run: OpenOutput, info: dict[str, Any], report: Callable[[dict[str, Any]], str | None] | None = None
) -> dict[str, Any]:
    """End the run: ``run.json`` (``run.record()``, ``output``, ``config_hash``, ``versions``, ``started``,
    ``finished``, then ``info``), then ``report(run_json)`` (its URI, or ``None`` for no report, kept as
    ``report`` in the returned dict), then ``_SUCCESS``, last. Returns the content of ``run.json``."""
    record = {**run.record(), "output": run.output_uri, "config_hash": run.config.config_hash(),
              "versions": versions(), "started": run.started, "finished": now(), **info}  # fmt: skip
    write_run_json(run.output_uri, record, run.storage_options)
    if report is not None:
        uri = report(record)
        if uri is not None:
            record["report"] = uri
    write_bytes(join(run.output_uri, SUCCESS), b"", run.storage_options)
    return record

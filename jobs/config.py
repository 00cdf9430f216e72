"""Reading job configs, one way for every command: a YAML file (a name in ``configs/``, a path or an fsspec URI),
its job's section (``customize:``, ``train:``) when it has one, then ``--set key=value`` overrides, into the
job's typed config (``load_config``); and the arguments every command shares (``add_config_arguments``,
``add_ray_arguments``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import yaml

from stylid_core.config import ConfigError, JobConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A config file path; names (``default``, ``stylize_tiny.yaml``, ``configs/default.yaml``) not found from the
    current folder are looked up in the project's ``configs/`` (its file name), so the README's commands work from
    any folder. A URI (``s3://...``) is returned as it is."""
    if "://" in name_or_path or os.path.isfile(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    candidate = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.isfile(candidate):
        return candidate
    raise ConfigError(
        f"config {name_or_path!r} not found: not a file from {os.getcwd()}, and {candidate} does not exist"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set has an empty key: {text!r}")
    return keys, yaml.safe_load(raw) if raw.strip() else None


def _read_yaml(path: str) -> Any:
    resolved = resolve_config_path(path)
    if "://" in resolved:
        import fsspec

        with fsspec.open(resolved, "r") as f:
            return yaml.safe_load(f)
    with open(resolved) as f:
        return yaml.safe_load(f)


def load_config_dict(
    path: str | None, overrides: list[str] | None = None, section: str | None = None, values: dict | None = None
) -> dict:
    """The YAML mapping at ``path`` (none: empty), its ``section`` when it has one (``customize:`` of a customize
    config; a file without it is the section itself), with ``overrides`` (``--set a.b=value``, values parsed as
    YAML) applied, then ``values`` (``{"a.b": value}``, taken as they are: a command's own flags; ``None``
    skipped)."""
    data: dict[str, Any] = {}
    if path:
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping")
        data = loaded or {}
        if section is not None and section in data:
            data = data[section]
            if not isinstance(data, dict):
                raise ConfigError(f"config {path}: {section} must be a mapping")
    settings = [(*parse_override(text), text) for text in overrides or []]
    given = {key: value for key, value in (values or {}).items() if value is not None}
    settings += [(key.split("."), value, f"{key}={value}") for key, value in given.items()]
    for keys, value, text in settings:
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a mapping")
        node[keys[-1]] = value
    return data


def _run(data: dict) -> JobConfig:
    return JobConfig.from_dict(data)


def _score(data: dict):
    from stylid_core.config import ScoreJobConfig
    from stylid_core.gate import GateConfig

    gate = data.pop("gate", None)
    return ScoreJobConfig.from_dict(data), GateConfig.from_dict(gate)


def _customize(data: dict):
    from stylid_core.customize.job_config import CustomizeJobConfig

    return CustomizeJobConfig.from_dict(data)


def _train(data: dict):
    from stylid_core.customize.facesnap.training import FaceSnapTrainConfig  # torch loads with this command only

    return FaceSnapTrainConfig.from_dict(data)


#: job -> (its section in a YAML, if any; the typed config built from the mapping)
JOBS = {"run": (None, _run), "score": (None, _score), "customize": ("customize", _customize),
        "train": ("train", _train)}  # fmt: skip


def load_config(job: str, path: str | None, overrides: list[str] | None = None, values: dict | None = None) -> Any:
    """The typed config of ``job`` (``run``: ``JobConfig``; ``score``: ``(ScoreJobConfig, GateConfig)``, the gate
    from its ``gate:`` section; ``customize``: ``CustomizeJobConfig``; ``train``: ``FaceSnapTrainConfig``) from
    the YAML at ``path``, ``--set`` overrides and ``values`` (``load_config_dict``); ``ConfigError`` when
    invalid."""
    section, build = JOBS[job]
    return build(load_config_dict(path, overrides, section, values))


def load_job_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    """``stylid run``'s typed config (``load_config("run", ...)``)."""
    return load_config("run", path, overrides)


def load_score_config(path: str, overrides: list[str] | None = None):
    """``stylid score``'s config and the gate's thresholds (``load_config("score", ...)``)."""
    return load_config("score", path, overrides)


def add_config_arguments(p: argparse.ArgumentParser, default: str | None = None, what: str = "") -> None:
    """``--config`` (required when there is no ``default``) and ``--set KEY=VALUE`` (repeatable)."""
    if default is None:
        p.add_argument("--config", required=True, help=f"config name in configs/, a YAML path or URI{what}")
    else:
        p.add_argument("--config", default=default, help=f"config name in configs/, a YAML path or URI{what}"
                       f" (default: {default})")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. io.rows_per_shard=1000 (repeatable)")  # fmt: skip


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """``--address`` and ``--num-cpus``, for ``jobs.ray_cluster.init_ray(args.address, args.num_cpus)``."""
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


def add_output_arguments(p: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    """``--output`` and ``--overwrite`` (``jobs.output.open_output``)."""
    p.add_argument("--output", required=required, default=default,
                   help="output folder or URI" + (f" (default: ./{default})" if default else ""))  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output written with another config")  # fmt: skip

"""Reading job configs: YAML files plus ``--set key=value`` overrides, into typed ``JobConfig`` objects."""

from __future__ import annotations

import os
from typing import Any

import yaml

from stylid_core.config import ConfigError, JobConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A config file path; names (``default``, ``stylize_tiny.yaml``, ``configs/default.yaml``) not found from the
    current folder are looked up in the project's ``configs/`` (its file name), so the README's commands work from
    any folder."""
    if os.path.isfile(name_or_path):
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


def load_config_dict(path: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path:
        with open(resolve_config_path(path)) as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping")
        data = loaded or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a mapping")
        node[keys[-1]] = value
    return data


def load_job_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    """The typed config from a YAML file (or the defaults) and overrides; raises ``ConfigError`` when invalid."""
    return JobConfig.from_dict(load_config_dict(path, overrides))

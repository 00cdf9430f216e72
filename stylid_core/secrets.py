"""Credentials never written: what counts as one, and how run files, reports and messages are cleaned of them.

Credentials reach stylid three ways: ``io.storage_options`` in a config file or ``--set`` (s3fs's ``key``,
``secret``, ``token``; other filesystems' ``password``, ``account_key``, ``sas_token``, ...), and the standard
environment variables (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ...). ``redact`` replaces the values of
secret-named keys in anything about to be written (``run.json``'s config); ``scrub`` removes known secret values
from free text (error messages, the metrics' ``error`` column), whichever way they came.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: what a redacted value reads as
REDACTED = "<redacted>"

#: environment variables holding credentials (values scrubbed from messages; carried to the stages in memory)
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)

#: option names that hold a credential: s3fs key/secret/token, passwords, account keys, SAS tokens, signatures
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|signature|sas|auth", re.IGNORECASE)
#: names that match the pattern above but are not secret
_NOT_SECRET = {"key_prefix", "cache_key", "skip_instance_cache"}
#: shorter values are not scrubbed from text (they would mangle ordinary words)
MIN_SCRUB_LEN = 6


def is_secret_name(name: str) -> bool:
    """Whether an option or variable named ``name`` holds a credential."""
    return name.lower() not in _NOT_SECRET and bool(_SECRET_NAME.search(name))


def redact(value: Any, name: str = "") -> Any:
    """A copy of ``value`` (mappings and lists, recursively) with every secret-named entry's value replaced by
    ``REDACTED``; empty values stay as they are (nothing to hide, and the reader sees the option was unset)."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if name and is_secret_name(name) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def secret_values(*options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> set[str]:
    """The credential values in ``options`` (secret-named entries, recursively) and in the environment
    (``CREDENTIAL_ENV``, and any variable with a secret name whose value is long enough to be one)."""
    found: set[str] = set()

    def walk(node: Any, name: str = "") -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, name)
        elif name and is_secret_name(name) and isinstance(node, str):
            found.add(node)

    for opts in options:
        walk(opts or {})
    env = os.environ if environ is None else environ
    for k in CREDENTIAL_ENV:
        if env.get(k):
            found.add(env[k])
    return {v for v in found if len(v) >= MIN_SCRUB_LEN}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``REDACTED`` (longest first)."""
    for s in sorted(set(secrets), key=len, reverse=True):
        if s and s in text:
            text = text.replace(s, REDACTED)
    return text


def secrets_in_overrides(overrides: Iterable[str]) -> set[str]:
    """Secret values given as ``--set a.b.secret=VALUE`` (the last key names the option)."""
    found = set()
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and is_secret_name(key.strip().split(".")[-1]) and len(value.strip()) >= MIN_SCRUB_LEN:
            found.add(value.strip())
    return found

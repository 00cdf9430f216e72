"""The driver's environment, carried to the stages' workers without Ray writing the credentials down.

Workers of a local Ray inherit the environment Ray was started with, not later changes; cluster workers have
their own. So the driver forwards what the stages need. Non-secret variables (the S3 endpoint and region, offline
model loading) go in the stages' ``runtime_env`` (applied before the worker imports anything, which
``HF_HUB_OFFLINE`` needs). Credentials do not: Ray's runtime-env agent logs every ``runtime_env`` it builds,
``env_vars`` included, in plain text (``runtime_env_agent.log``; measured: 13 lines per job). They travel instead
as a ``StageCredentials`` constructor argument of the stage (``with_credentials``), which Ray keeps in memory (the
task spec and the object store), and the stage's ``__init__`` exports them into its own worker process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from stylid_core.secrets import CREDENTIAL_ENV

#: non-secret driver variables every stage needs too (object-store endpoint and region, offline model loading,
#: the Arrow allocator: ``jobs.arrow_memory``)
PUBLIC_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "ARROW_DEFAULT_MEMORY_POOL")  # fmt: skip


class StageCredentials:
    """Credential environment variables of the driver, for the stages' processes; never shown.

    ``repr`` and ``str`` name the variables only, so a log line or traceback that prints a stage's arguments shows
    no value. Pickles like any object (that is how Ray hands it to the worker, in memory)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> StageCredentials:
        env = os.environ if environ is None else environ
        return cls({k: env[k] for k in CREDENTIAL_ENV if env.get(k)})

    def names(self) -> list[str]:
        return sorted(self._values)

    def export(self) -> None:
        """Set the variables in this process (a stage's worker), replacing the node's own."""
        os.environ.update(self._values)

    def __bool__(self) -> bool:
        return bool(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageCredentials) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(self.names()))

    def __repr__(self) -> str:
        return f"StageCredentials({', '.join(self.names()) or 'none'})"

    __str__ = __repr__


def stage_runtime_env() -> dict:
    """``ray_remote_args`` for every stage: a ``runtime_env`` with the driver's ``PUBLIC_ENV`` (no credential)."""
    env = {k: os.environ[k] for k in PUBLIC_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def with_credentials(stage: type, credentials: StageCredentials | None) -> type:
    """``stage`` itself when there is nothing to carry, else a subclass of the same name whose ``__init__`` first
    exports ``credentials`` in the worker and then builds the stage. The subclass holds the credentials in its
    closure: Ray ships it with the actor's definition (pickled, in memory), never in a ``runtime_env``."""
    if not credentials:
        return stage

    def __init__(self, *args, **kwargs) -> None:
        credentials.export()
        stage.__init__(self, *args, **kwargs)

    return type(stage.__name__, (stage,), {"__init__": __init__, "__doc__": stage.__doc__})


def task_with_credentials(fn, credentials: StageCredentials | None):
    """For a stage that runs as tasks (a function, or a callable instance): ``fn`` itself when there is nothing to
    carry, else a function of the same name that exports ``credentials`` in the worker, then calls ``fn``."""
    if not credentials:
        return fn

    def call(batch, *args, **kwargs):
        credentials.export()
        return fn(batch, *args, **kwargs)

    call.__name__ = call.__qualname__ = getattr(fn, "__name__", type(fn).__name__)
    return call

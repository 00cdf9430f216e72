"""Credentials reach the stages' workers in memory: exported by the stage in its own process, never put in a
``runtime_env`` (which Ray's runtime-env agent logs), never shown by ``repr``."""

from __future__ import annotations

import os
import pickle

import pandas as pd
import pytest

from pipelines.credentials import StageCredentials, stage_runtime_env, task_with_credentials, with_credentials
from pipelines.resources import stage_remote_args

TOKEN = "planted-session-token-0123456789"


class EnvProbe:
    """A stage reporting, per row, the worker's value of the variable named in the row."""

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df["value"] = [os.environ.get(name, "") for name in df["name"]]
        df["pid"] = os.getpid()
        return df


@pytest.fixture
def planted(monkeypatch):
    """A credential set on the driver after Ray started: its workers do not have it."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    return StageCredentials.from_environ()


def test_credentials_are_named_never_shown(planted):
    assert "AWS_SESSION_TOKEN" in planted.names()
    for text in (repr(planted), str(planted), f"{planted!r}", repr({"credentials": planted})):
        assert TOKEN not in text and "AWS_SESSION_TOKEN" in text
    assert pickle.loads(pickle.dumps(planted)) == planted


def test_the_runtime_env_carries_no_credential(planted):
    env = stage_remote_args()["runtime_env"]["env_vars"]
    assert env["AWS_DEFAULT_REGION"] == "eu-west-3"  # non-secret variables still travel this way
    assert "AWS_SESSION_TOKEN" not in env and TOKEN not in repr(stage_runtime_env())


def test_a_stage_gets_the_drivers_credentials_in_its_own_process(ray_session, planted):
    ray = ray_session
    from ray.data import ActorPoolStrategy

    rows = pd.DataFrame({"name": ["AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"]})

    def run(stage) -> pd.DataFrame:
        ds = ray.data.from_pandas(rows).map_batches(
            stage, batch_format="pandas", num_cpus=0.25, compute=ActorPoolStrategy(size=1), **stage_remote_args()
        )
        return ds.to_pandas().set_index("name")

    bare = run(EnvProbe)
    assert bare.at["AWS_SESSION_TOKEN", "value"] == ""  # the worker never had it: only the stage can bring it
    assert bare.at["AWS_DEFAULT_REGION", "value"] == "eu-west-3"  # through the runtime_env
    carried = run(with_credentials(EnvProbe, planted))
    assert carried.at["AWS_SESSION_TOKEN", "value"] == TOKEN
    assert carried["pid"].iloc[0] != os.getpid()
    assert with_credentials(EnvProbe, planted).__name__ == "EnvProbe"  # Ray Data's operator keeps its name
    assert with_credentials(EnvProbe, StageCredentials({})) is EnvProbe


def test_a_task_stage_gets_them_too(ray_session, planted):
    """Stages that run as tasks (a function or a callable instance, like the write stages) are wrapped alike."""
    ray = ray_session
    rows = pd.DataFrame({"name": ["AWS_SESSION_TOKEN"]})
    probe = EnvProbe()  # a callable instance, as ``WriteStage(...)`` is
    task = task_with_credentials(probe, planted)
    assert task.__name__ == "EnvProbe" and task_with_credentials(probe, StageCredentials({})) is probe

    def run(fn) -> list[str]:
        ds = ray.data.from_pandas(rows).map_batches(fn, batch_format="pandas", num_cpus=0.25, **stage_remote_args())
        return ds.to_pandas()["value"].tolist()

    assert run(probe) == [""]  # the task workers never had it
    assert run(task) == [TOKEN]

"""What counts as a credential, and how run files, metrics and messages are cleaned of them."""

from __future__ import annotations

import json

import pandas as pd

from jobs.cli import main
from jobs.output import write_run_json
from pipelines.schema import COLUMNS
from pipelines.stages import WriteStage
from stylid_core.config import IOConfig, JobConfig
from stylid_core.secrets import REDACTED, is_secret_name, redact, scrub, secret_values, secrets_in_overrides


def test_secret_names():
    for name in ("key", "secret", "token", "password", "session_token", "aws_secret_access_key", "account_key",
                 "sas_token", "client_secret", "api_key", "credentials"):  # fmt: skip
        assert is_secret_name(name), name
    for name in ("endpoint_url", "region_name", "anon", "use_ssl", "max_bytes", "image_format", "cache_key"):
        assert not is_secret_name(name), name


def test_redact_hides_values_of_secret_keys_recursively_and_keeps_the_rest():
    opts = {"key": "AKIA123456", "secret": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9000",
            "client_kwargs": {"region_name": "us-east-1", "aws_session_token": "tok-123456"}, "token": ""}  # fmt: skip
    out = redact({"io": {"storage_options": opts}})["io"]["storage_options"]
    assert out == {"key": REDACTED, "secret": REDACTED, "endpoint_url": "http://127.0.0.1:9000",
                   "client_kwargs": {"region_name": "us-east-1", "aws_session_token": REDACTED}, "token": ""}
    assert opts["secret"] == "s3cr3t-value"  # a copy: the config keeps its credentials for the stages


def test_secret_values_from_options_and_environment_and_scrub():
    env = {"AWS_SECRET_ACCESS_KEY": "env-secret-value", "AWS_SESSION_TOKEN": "tok", "HOME": "/root"}
    found = secret_values({"secret": "opt-secret-value", "endpoint_url": "http://x"}, environ=env)
    assert found == {"env-secret-value", "opt-secret-value"}  # "tok" too short to scrub without mangling text
    text = "403 for key opt-secret-value (signed with env-secret-value) at http://x"
    assert scrub(text, found) == f"403 for key {REDACTED} (signed with {REDACTED}) at http://x"
    assert secrets_in_overrides(["io.storage_options.secret=given-on-cli", "faces.upsample=1"]) == {"given-on-cli"}


def test_run_json_carries_no_credential(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-in-a-message")
    config = JobConfig.from_dict({"io": {"storage_options": {"key": "AKIAKEY0001", "secret": "opt-secret-0001"}}})
    info = {"config": config.to_dict(), "note": "failed with env-secret-in-a-message and opt-secret-0001"}
    write_run_json(str(tmp_path), info, config.io.storage_options)
    text = (tmp_path / "run.json").read_text()
    for secret in ("AKIAKEY0001", "opt-secret-0001", "env-secret-in-a-message"):
        assert secret not in text
    written = json.loads(text)
    assert written["config"]["io"]["storage_options"] == {"key": REDACTED, "secret": REDACTED}
    assert "opt-secret-0001" not in repr(config)  # a logged config shows no storage options


def test_metrics_error_column_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token-in-an-error")
    io = IOConfig(storage_options={"password": "opt-password-01"})
    row = {c: None for c in COLUMNS}
    row.update(image_id="a", image_uri="s3://b/a.jpg", status="read_error",
               error="denied: password=opt-password-01 token=env-token-in-an-error")  # fmt: skip
    df = pd.DataFrame([row])
    metrics = WriteStage(str(tmp_path), "h", "", io)(df)  # the rows the ledger's shard writer stores
    error = metrics.column("error")[0].as_py()
    assert error == f"denied: password={REDACTED} token={REDACTED}"


def test_cli_error_messages_are_scrubbed(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-shown-in-error")
    # a bad value that happens to be the secret: the message quotes it
    code = main(["run", "--output", str(tmp_path), "--set", "faces.backend=env-secret-shown-in-error"])
    err = capsys.readouterr().err
    assert code == 2 and "env-secret-shown-in-error" not in err and REDACTED in err

"""Fail fast, say what: a bad manifest, output or style image stops ``stylid run`` / ``stylid customize`` before Ray
starts and before any model loads, with one line naming the URI and the cause, and exit status 2.

Storage is a real S3 endpoint (moto on 127.0.0.1): a missing bucket, a bucket whose policy denies ``PutObject``
(moto enforces bucket policies), and local paths. The CLI runs in its own process (``guarded_cli``) with
``init_ray`` and the face-model factories patched to exit with status 70 if reached: "before Ray and models" is
asserted that way, not by timing.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import boto3
import pandas as pd
import pytest

from pipelines.preflight import PROBE_PREFIX, preflight_run
from stylid_core.config import JobConfig
from tests.pipelines.conftest import write_manifest

BUCKET = "preflight-ok"
DENY = "preflight-deny-put"


@pytest.fixture(scope="module")
def s3(s3_endpoint, inputs):
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    for name in (BUCKET, DENY):
        client.create_bucket(Bucket=name)
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                    "Resource": f"arn:aws:s3:::{DENY}/*"}]}  # fmt: skip
    client.put_bucket_policy(Bucket=DENY, Policy=json.dumps(deny))
    with open(inputs["obama"], "rb") as f:
        client.put_object(Bucket=BUCKET, Key="in/obama.jpg", Body=f.read())
    client.put_object(Bucket=BUCKET, Key="styles/broken.jpg", Body=b"<html>not a style</html>")

    def manifest(key: str, rows: list[dict]) -> str:
        buf = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buf, index=False)
        client.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())
        return f"s3://{BUCKET}/{key}"

    good = [{"image_id": "obama", "image_uri": f"s3://{BUCKET}/in/obama.jpg"}]
    return {
        "client": client,
        "good": manifest("m/good.parquet", good),
        "no_uri": manifest("m/no_uri.parquet", [{"image_id": "a", "path": "x.jpg"}]),
        "dupes": manifest("m/dupes.parquet", good * 2),
        "bad_row_style": manifest("m/bad_style.parquet", [{**good[0], "style_uri": f"s3://{BUCKET}/styles/gone.jpg"}]),
    }


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """The CLI in its own process (real exit status and stderr), Ray start-up and model loads forbidden."""
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.pipelines.guarded_cli", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def _assert_one_line(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, (code, err)  # 70: Ray or a model was reached first
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


@pytest.mark.parametrize(
    "case, manifest_key, output, extra, needles",
    [
        ("missing bucket", "good", "s3://no-such-bucket-here/out", [],
         ["s3://no-such-bucket-here/out", "bucket does not exist"]),
        ("PutObject denied", "good", f"s3://{DENY}/out", [], [f"s3://{DENY}/out", "not writable (forbidden)"]),
        ("missing manifest", None, f"s3://{BUCKET}/out", [],
         [f"s3://{BUCKET}/m/nope.parquet", "cannot read manifest"]),
        ("no image_uri", "no_uri", f"s3://{BUCKET}/out", [], [f"s3://{BUCKET}/m/no_uri.parquet", "'image_uri'"]),
        ("duplicate ids", "dupes", f"s3://{BUCKET}/out", [], [f"s3://{BUCKET}/m/dupes.parquet", "duplicate image_id"]),
        ("undecodable style", "good", f"s3://{BUCKET}/out", ["--set", f"stylize.style_uri=s3://{BUCKET}/styles/broken.jpg"],
         [f"s3://{BUCKET}/styles/broken.jpg", "decode_error", "not an image"]),
        ("missing row style", "bad_row_style", f"s3://{BUCKET}/out", [],
         [f"s3://{BUCKET}/styles/gone.jpg", "(missing)"]),
    ],
)  # fmt: skip
def test_stylid_run_fails_fast_in_one_line(s3, case, manifest_key, output, extra, needles):
    manifest = s3[manifest_key] if manifest_key else f"s3://{BUCKET}/m/nope.parquet"
    code, err = _run_cli(["run", "--manifest", manifest, "--output", output, *extra])
    _assert_one_line(code, err, "stylid run: error:", *needles)


def test_local_paths_too(inputs, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"image_uri": inputs["obama"]}] * 2)
    code, err = _run_cli(["run", "--manifest", manifest, "--output", str(tmp_path / "out")])
    _assert_one_line(code, err, manifest, "duplicate image_id")
    blocked = tmp_path / "a-file"
    blocked.write_text("the output cannot be a folder below a file")
    good = write_manifest(str(tmp_path / "g.parquet"), [{"image_uri": inputs["obama"]}])
    code, err = _run_cli(["run", "--manifest", good, "--output", str(blocked / "out")])
    _assert_one_line(code, err, str(blocked / "out"), "not writable")
    code, err = _run_cli(["run", "--manifest", good, "--output", str(tmp_path / "o2"), "--set",
                                  f"stylize.style_uri={inputs['notimage']}"])  # fmt: skip
    _assert_one_line(code, err, inputs["notimage"], "style image")


def test_stylid_customize_fails_fast_in_one_line(s3, inputs, tmp_path):
    no_col = write_manifest(str(tmp_path / "c.parquet"), [{"prompt": "a portrait", "image": inputs["obama"]}])
    code, err = _run_cli(["customize", "--config", "configs/customize_tiny.yaml", "--manifest", no_col,
                                  "--output", f"s3://{BUCKET}/cust"])  # fmt: skip
    _assert_one_line(code, err, "stylid customize: error:", no_col, "'reference_uri'")
    good = write_manifest(str(tmp_path / "g.parquet"), [{"reference_uri": inputs["obama"], "prompt": "a portrait"}])
    code, err = _run_cli(["customize", "--config", "configs/customize_tiny.yaml", "--manifest", good,
                                  "--output", f"s3://{DENY}/cust"])  # fmt: skip
    _assert_one_line(code, err, f"s3://{DENY}/cust", "forbidden")


def test_a_good_job_passes_and_leaves_no_probe(s3, inputs):
    preflight_run(JobConfig(), s3["good"], f"s3://{BUCKET}/clean-out")
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="clean-out/").get("Contents", [])
    assert not [o["Key"] for o in listed if PROBE_PREFIX in o["Key"]]
    preflight_run(JobConfig(), None, f"s3://{BUCKET}/clean-out")  # the bundled sample: output and bundled style

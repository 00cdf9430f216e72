"""The job from an s3:// manifest to an s3:// output on a real S3 endpoint (moto's server) on 127.0.0.1.

Two routes to the endpoint: the standard AWS environment variables (set before Ray starts, so the workers inherit
them), and ``io.storage_options`` in the config (sent to the workers with the stages) pointing at a second,
separate server, so the test can tell which route carried the data.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
import s3fs

from jobs.run import run_job
from stylid_core.config import JobConfig

BUCKET = "stylid-test"
EXPECTED = {"obama": "ok", "scene": "ok", "gone": "missing"}


def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"},
        skip_instance_cache=True,
    )  # fmt: skip


def _upload(fs: s3fs.S3FileSystem, endpoint: str, inputs: dict[str, str]) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    rows = []
    for image_id in ("obama", "scene"):
        key = f"{BUCKET}/inputs/{os.path.basename(inputs[image_id])}"
        fs.put_file(inputs[image_id], key)
        rows.append({"image_id": image_id, "image_uri": f"s3://{key}"})
    rows.append({"image_id": "gone", "image_uri": f"s3://{BUCKET}/inputs/not-uploaded.jpg"})
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    fs.pipe_file(f"{BUCKET}/inputs/manifest.parquet", buf.getvalue())
    return f"s3://{BUCKET}/inputs/manifest.parquet"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def second_endpoint():
    """A second moto server in its own process (servers in one process share their state)."""
    port = _free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def _check_output(fs: s3fs.S3FileSystem, prefix: str, config: JobConfig, info: dict) -> None:
    assert fs.exists(f"{prefix}/_SUCCESS") and fs.exists(f"{prefix}/run.json") and fs.exists(f"{prefix}/report.html")
    run = json.loads(fs.cat_file(f"{prefix}/run.json"))
    assert run["config_hash"] == config.config_hash() and run["this_run"]["processed"] == len(EXPECTED)
    shards = fs.ls(f"{prefix}/metrics", detail=False)
    assert shards and all(s.rsplit("/", 1)[-1].startswith("part-") for s in shards)
    metrics = pd.concat([pd.read_parquet(io.BytesIO(fs.cat_file(s))) for s in shards])
    assert sorted(metrics["image_id"]) == sorted(EXPECTED) and metrics["image_id"].is_unique
    assert dict(zip(metrics["image_id"], metrics["status"])) == EXPECTED
    gone = metrics.set_index("image_id").loc["gone"]
    assert "not found" in gone["error"]
    suffix = f"-{config.config_hash()}"
    images = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/images", detail=False))
    assert images == [f"obama{suffix}.png", f"scene{suffix}.png"]
    assert set(metrics["output_uri"].dropna()) == {f"s3://{prefix}/images/{n}" for n in images}
    faces = [pd.read_parquet(io.BytesIO(fs.cat_file(s))) for s in fs.ls(f"{prefix}/faces", detail=False)]
    assert sum(len(f) for f in faces) >= 3  # one in the portrait, two in the scene
    assert info["this_run"]["status_counts"] == {"ok": 2, "missing": 1}


def test_job_through_the_aws_environment_variables(ray_session, s3_endpoint, inputs):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    fs = _fs(s3_endpoint)
    manifest = _upload(fs, s3_endpoint, inputs)
    config = JobConfig.from_dict({"score": {"redetect": False}})
    assert config.io.storage_options == {}
    info = run_job(config, f"s3://{BUCKET}/out-env", manifest)
    _check_output(fs, f"{BUCKET}/out-env", config, info)
    # a rerun finds everything done through the same route
    assert run_job(config, f"s3://{BUCKET}/out-env", manifest)["this_run"]["processed"] == 0


def test_job_through_storage_options(ray_session, s3_endpoint, second_endpoint, inputs):
    fs2 = _fs(second_endpoint)
    manifest = _upload(fs2, second_endpoint, inputs)
    options = {"endpoint_url": second_endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}  # fmt: skip
    # load and write as separate tasks here: storage_options must reach those workers too
    config = JobConfig.from_dict(
        {"score": {"redetect": False}, "io": {"storage_options": options}, "resources": {"fuse_io": False}}
    )
    info = run_job(config, f"s3://{BUCKET}/out-opts", manifest)
    _check_output(fs2, f"{BUCKET}/out-opts", config, info)
    # nothing went to the server the environment points at
    assert not _fs(s3_endpoint).exists(f"{BUCKET}/out-opts")

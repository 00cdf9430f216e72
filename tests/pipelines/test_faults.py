"""Faults survived, on a real local Ray: S3 failing a share of requests (503s, requests held past the timeout), an
actor killed mid-run, the driver killed with SIGKILL mid-run and the job rerun.

What must hold each time, checked by behaviour rather than by the layout of the output's shards: every manifest id
once in the metrics with its status, face rows only for ok rows and exactly ``n_faces`` of them (no orphans, no
duplicates), every object whole, and after a crash the rerun processes exactly the rows the ledger lacked.
"""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import threading
import time

import boto3
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.run import run_job
from stylid_core.config import JobConfig
from tests.faultproxy import FaultProxy
from tests.pipelines.conftest import write_manifest
from tests.stored_rows import stored_rows

BUCKET = "faults"
#: a cheaper default: no re-detection, no no-mosaic comparison (the faults, not the models, are under test)
CHEAP = {"score": {"redetect": False, "compare_without_mosaic": False}}
PER_IMAGE = {"obama": "ok", "biden": "ok", "scene": "ok", "noface": "no_face", "notimage": "decode_error"}


def _rows(inputs, n: int) -> tuple[list[dict], dict[str, str]]:
    """``n`` rows cycling through the small inputs (distinct ids, shared files) and their expected statuses."""
    stems = list(PER_IMAGE)
    rows = [{"image_id": f"r{k:03d}-{stems[k % len(stems)]}", "image_uri": inputs[stems[k % len(stems)]]}
            for k in range(n)]  # fmt: skip
    return rows, {r["image_id"]: PER_IMAGE[r["image_id"].split("-", 1)[1]] for r in rows}


def check_whole(metrics: pd.DataFrame, faces: pd.DataFrame, expected: dict[str, str]) -> None:
    """Every id once with its status; face rows exactly for the ok rows, ``n_faces`` each, none twice."""
    assert metrics["image_id"].is_unique, metrics["image_id"][metrics["image_id"].duplicated()].tolist()
    assert sorted(metrics["image_id"]) == sorted(expected)
    got = dict(zip(metrics["image_id"], metrics["status"]))
    assert got == expected, {k: (v, got[k]) for k, v in expected.items() if got[k] != v}
    ok = metrics[metrics["status"] == "ok"].set_index("image_id")
    assert set(faces["image_id"]) <= set(ok.index), "face rows of ids that are not ok rows (orphans)"
    assert not faces.duplicated(["image_id", "face_index"]).any(), "duplicated face rows"
    counts = faces.groupby("image_id").size()
    assert {k: int(counts.get(k, 0)) for k in ok.index} == {k: int(v) for k, v in ok["n_faces"].items()}


def _local_output(output: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics and face rows of a local output, every object under it checked whole on the way."""
    for path in glob.glob(f"{output}/**/*.parquet", recursive=True):
        pq.read_table(path)  # raises on a truncated Parquet file
    for path in glob.glob(f"{output}/images/*"):
        with Image.open(path) as img:
            img.load()  # raises on a truncated image
    return stored_rows(f"{output}/metrics"), stored_rows(f"{output}/faces")


# -- S3 answering 503 or timing out for a share of requests ------------------------------------------------------


@pytest.fixture(scope="module")
def s3(s3_endpoint, inputs):
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    for stem in PER_IMAGE:
        with open(inputs[stem], "rb") as f:
            client.put_object(Bucket=BUCKET, Key=f"in/{stem}", Body=f.read())
        client.put_object(Bucket=BUCKET, Key=f"private/{stem}", Body=b"never served")
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                                                    "Resource": f"arn:aws:s3:::{BUCKET}/private/*"}]}  # fmt: skip
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(deny))
    return client


@pytest.mark.slow
def test_a_run_through_a_failing_s3_ends_whole(ray_session, s3, s3_endpoint):
    stems = list(PER_IMAGE)
    rows = [{"image_id": f"s{k}-{stems[k % 5]}", "image_uri": f"s3://{BUCKET}/in/{stems[k % 5]}"} for k in range(10)]
    expected = {r["image_id"]: PER_IMAGE[r["image_id"].split("-", 1)[1]] for r in rows}
    rows += [{"image_id": "gone", "image_uri": f"s3://{BUCKET}/in/never-uploaded.jpg"},
             {"image_id": "denied", "image_uri": f"s3://{BUCKET}/private/obama"}]  # fmt: skip
    expected |= {"gone": "missing", "denied": "forbidden"}
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    s3.put_object(Bucket=BUCKET, Key="manifest.parquet", Body=buf.getvalue())
    with FaultProxy(s3_endpoint, fail_share=0.15, delay_share=0.03, delay_s=4.0, seed=11, max_requests=20_000,
                    lifetime_s=600) as proxy:  # fmt: skip
        options = {"endpoint_url": proxy.url, "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "us-east-1"}}  # fmt: skip
        config = JobConfig.from_dict({**CHEAP, "io": {"storage_options": options, "request_timeout_s": 1.5,
                                                      "retries": 8, "retry_backoff_s": 0.05}})  # fmt: skip
        info = run_job(config, f"s3://{BUCKET}/out", f"s3://{BUCKET}/manifest.parquet", report=False)
        stats = proxy.stats()
        metrics = stored_rows(f"s3://{BUCKET}/out/metrics", options)
        faces = stored_rows(f"s3://{BUCKET}/out/faces", options)
    assert stats["failed"] >= 5 and stats["delayed"] >= 1, stats  # faults were injected, and survived
    check_whole(metrics, faces, expected)
    assert info["this_run"]["processed"] == len(expected)
    errors = metrics.set_index("image_id")["error"]
    assert "never-uploaded.jpg" in errors["gone"] and "private/obama" in errors["denied"]


# -- an actor killed mid-run --------------------------------------------------------------------------------------


def _stage_actors() -> list[psutil.Process]:
    """This test run's Ray worker processes that hold the stage actors (``ray::MapWorker(...FusedCPUStage...)``)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "MapWorker" in title and "FusedCPUStage" in title:
            out.append(p)
    return out


def _progress(output: str) -> bool:
    """Whether the run has written anything yet (an image or a metrics shard): it is then mid-run."""
    return bool(glob.glob(f"{output}/images/*") or glob.glob(f"{output}/metrics/*.parquet"))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_replaced_and_the_run_ends_whole(ray_session, inputs, tmp_path):
    rows, expected = _rows(inputs, 20)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    output = str(tmp_path / "out")
    result: dict = {}

    def run() -> None:
        try:
            result["info"] = run_job(JobConfig.from_dict(CHEAP), output, manifest, report=False)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _wait_for(lambda: _progress(output), 240, "the first written rows")
    victim = _wait_for(_stage_actors, 30, "a stage actor")[0]
    assert thread.is_alive() and len(stored_rows(f"{output}/metrics")) < len(expected), "killed too late"
    victim.send_signal(signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive(), "the run did not end after an actor was killed"
    assert "error" not in result, result.get("error")
    assert not victim.is_running()
    metrics, faces = _local_output(output)
    check_whole(metrics, faces, expected)
    assert result["info"]["this_run"]["processed"] == len(expected)


# The driver killed with SIGKILL mid-run, then the job rerun: tests/pipelines/test_scale_job.py (with shards of 25
# rows, so the ledger holds rows when the driver dies and the rerun's 'only the missing rows' is checked).

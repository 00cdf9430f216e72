"""The bad-input corpus (``tests/bad_inputs.py``) through the stages and through a real run on Ray over S3: every
case ends with its status, every error row's message names the image's URI, nothing is lost."""

from __future__ import annotations

import io
import json

import boto3
import pandas as pd
import pytest

from jobs.run import run_job
from pipelines.stages import FusedCPUStage, prepare_rows
from pipelines.stylize import stylize_chain
from stylid_core.config import JobConfig
from tests.bad_inputs import MANY_FACES_KEPT, build_bad_corpus

BUCKET = "bad-inputs"
#: the default config, with the hundreds-of-faces case kept short (its largest faces only) and no re-detection
CONFIG = {"faces": {"max_faces": MANY_FACES_KEPT}, "score": {"redetect": False}}


@pytest.fixture(scope="module")
def corpus():
    return build_bad_corpus()


def _check(rows: pd.DataFrame, expected: dict[str, str]) -> None:
    assert sorted(rows["image_id"]) == sorted(expected) and rows["image_id"].is_unique
    got = dict(zip(rows["image_id"], rows["status"]))
    assert got == expected, {k: (expected[k], got[k]) for k in expected if got[k] != expected[k]}
    for _, row in rows.iterrows():
        if row["status"] not in ("ok", "no_face"):
            assert row["image_uri"] in row["error"], (row["image_id"], row["error"])
    many = rows.set_index("image_id").loc["many_faces.jpg"]
    assert many["n_faces_detected"] >= 150 and many["n_faces"] == MANY_FACES_KEPT


@pytest.mark.slow
def test_every_case_gets_its_status_through_the_stages(corpus, tmp_path):
    """The very stage classes a run uses (load, faces, stylize, score, write), in this process."""
    config = JobConfig.from_dict(CONFIG)
    rows = prepare_rows(pd.DataFrame([{"image_id": n, "image_uri": c.path} for n, c in corpus.items()]), None)
    stage = FusedCPUStage([(s.cls, s.kwargs) for s in stylize_chain(config, str(tmp_path), key_suffix="")])
    out = pd.concat([stage(rows.iloc[k : k + 4].reset_index(drop=True)).to_pandas() for k in range(0, len(rows), 4)])
    _check(out, {n: c.status for n, c in corpus.items()})


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, corpus):
    """The corpus in a bucket (unicode keys included), a manifest with a missing and a forbidden URI besides."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    rows = []
    for name, case in corpus.items():
        with open(case.path, "rb") as f:
            client.put_object(Bucket=BUCKET, Key=f"in/{name}", Body=f.read())
        rows.append({"image_id": name, "image_uri": f"s3://{BUCKET}/in/{name}"})
    with open(corpus["portrait.webp"].path, "rb") as f:
        client.put_object(Bucket=BUCKET, Key="private/portrait.jpg", Body=f.read())
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                                                    "Resource": f"arn:aws:s3:::{BUCKET}/private/*"}]}  # fmt: skip
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(deny))
    rows.append({"image_id": "missing", "image_uri": f"s3://{BUCKET}/in/never-uploaded.jpg"})
    rows.append({"image_id": "forbidden", "image_uri": f"s3://{BUCKET}/private/portrait.jpg"})
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    client.put_object(Bucket=BUCKET, Key="manifest.parquet", Body=buf.getvalue())
    expected = {**{n: c.status for n, c in corpus.items()}, "missing": "missing", "forbidden": "forbidden"}
    return f"s3://{BUCKET}/manifest.parquet", expected, client


@pytest.mark.slow
def test_a_real_run_over_s3_gives_every_case_its_status(ray_session, s3_corpus):
    manifest, expected, client = s3_corpus
    config = JobConfig.from_dict(CONFIG)
    info = run_job(config, f"s3://{BUCKET}/out", manifest, report=False)
    assert info["this_run"]["processed"] == len(expected)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="out/metrics/")["Contents"]]
    metrics = pd.concat(
        [pd.read_parquet(io.BytesIO(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in keys]
    )
    _check(metrics, expected)
    # the unicode-named image was written under a storage-safe key
    written = metrics.set_index("image_id").loc["portrait-ñ-日本-😀.jpg", "output_uri"]
    assert written.startswith(f"s3://{BUCKET}/out/images/")
    assert client.head_object(Bucket=BUCKET, Key=written.split(f"{BUCKET}/", 1)[1])["ContentLength"] > 0

"""Storage retries against a real S3 endpoint (moto on 127.0.0.1) behind the fault-injecting proxy: transient
failures (503, timeouts) are retried with bounded backoff until they pass; permanent ones (404, 403) fail at once
with their row status and the URI."""

from __future__ import annotations

import errno
import json
import time

import boto3
import pytest

from stylid_core.storage import RetryPolicy, StorageError, is_transient, read_bytes, with_retries, write_bytes
from tests.faultproxy import FaultProxy

BUCKET = "retry-test"


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    for k in range(12):
        client.put_object(Bucket=BUCKET, Key=f"in/{k}.bin", Body=bytes([k]) * 1000)
    client.put_object(Bucket=BUCKET, Key="secret/x.bin", Body=b"hidden")
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                                                    "Resource": f"arn:aws:s3:::{BUCKET}/secret/*"}]}  # fmt: skip
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(deny))
    return client


def _options(url: str) -> dict:
    return {"endpoint_url": url, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"},
            "skip_instance_cache": True}  # fmt: skip


FAST = RetryPolicy(attempts=6, backoff_s=0.01, max_backoff_s=0.05, timeout_s=1.0)


def test_transient_classification():
    assert is_transient(OSError(errno.EBUSY, "Service Unavailable"))  # s3fs's mapping of a 503
    assert is_transient(TimeoutError("read timed out"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(FileNotFoundError("nope"))
    assert not is_transient(PermissionError("Forbidden"))
    assert not is_transient(ValueError("bad"))
    assert not is_transient(StorageError("too_large", "big"))


def test_with_retries_is_bounded_and_stops_at_permanent_errors():
    calls = []

    def flaky():
        calls.append(1)
        raise OSError(errno.EBUSY, "ServiceUnavailable")

    with pytest.raises(OSError):
        with_retries(flaky, "x", RetryPolicy(attempts=3, backoff_s=0.0))
    assert len(calls) == 3
    calls.clear()

    def gone():
        calls.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        with_retries(gone, "x", RetryPolicy(attempts=5, backoff_s=0.0))
    assert len(calls) == 1
    assert all(RetryPolicy(backoff_s=1.0, max_backoff_s=2.0).delay(k) <= 2.0 for k in range(10))


def test_reads_and_writes_survive_503s(bucket, s3_endpoint):
    with FaultProxy(s3_endpoint, fail_share=0.4, seed=1, max_requests=2000, lifetime_s=120) as proxy:
        opts = _options(proxy.url)
        for k in range(6):
            assert read_bytes(f"s3://{BUCKET}/in/{k}.bin", opts, max_bytes=10_000, retry=FAST) == bytes([k]) * 1000
        for k in range(4):
            write_bytes(f"s3://{BUCKET}/out/{k}.bin", b"w" * k, opts, retry=FAST)
        stats = proxy.stats()
    assert stats["failed"] >= 3, stats  # faults were injected (and retried through)
    for k in range(4):
        assert bucket.get_object(Bucket=BUCKET, Key=f"out/{k}.bin")["Body"].read() == b"w" * k


def test_without_retries_the_same_faults_fail_as_read_errors_naming_the_uri(bucket, s3_endpoint):
    with FaultProxy(s3_endpoint, fail_share=0.4, seed=1, max_requests=2000, lifetime_s=120) as proxy:
        opts = _options(proxy.url)
        errors = []
        for k in range(8):
            uri = f"s3://{BUCKET}/in/{k}.bin"
            try:
                read_bytes(uri, opts, max_bytes=10_000, retry=RetryPolicy(attempts=1, timeout_s=1.0))
            except StorageError as exc:
                errors.append((uri, exc))
    assert errors, "the proxy should have failed some single-try reads"
    for uri, exc in errors:
        assert exc.status == "read_error" and uri in str(exc) and "Service Unavailable" in str(exc)


def test_timeouts_are_retried(bucket, s3_endpoint):
    with FaultProxy(s3_endpoint, delay_share=0.3, delay_s=2.5, seed=3, max_requests=2000, lifetime_s=120) as proxy:
        opts = _options(proxy.url)
        t0 = time.monotonic()
        for k in range(6):
            assert read_bytes(f"s3://{BUCKET}/in/{k}.bin", opts, retry=FAST) == bytes([k]) * 1000
        took = time.monotonic() - t0
        stats = proxy.stats()
    assert stats["delayed"] >= 1, stats
    assert took < 60  # bounded: each held request costs one timeout (1 s), not the 2.5 s hold or a hang


def _permanent_failures(url: str, retry: RetryPolicy) -> list[StorageError]:
    out = []
    for uri in (f"s3://{BUCKET}/in/nope.bin", f"s3://{BUCKET}/secret/x.bin"):
        with pytest.raises(StorageError) as info:
            read_bytes(uri, _options(url), max_bytes=10_000, retry=retry)
        assert uri in str(info.value)
        out.append(info.value)
    return out


def test_permanent_errors_fail_at_once_with_their_status(bucket, s3_endpoint):
    with FaultProxy(s3_endpoint, lifetime_s=60) as proxy:
        missing, forbidden = _permanent_failures(proxy.url, FAST)
        with_retries_allowed = [(m, p) for m, p, _ in proxy.log]
    assert missing.status == "missing" and forbidden.status == "forbidden"
    with FaultProxy(s3_endpoint, lifetime_s=60) as proxy:
        _permanent_failures(proxy.url, RetryPolicy(attempts=1))
        single_try = [(m, p) for m, p, _ in proxy.log]
    # the requests a single try makes, and not one more: 404 and 403 were not retried
    assert with_retries_allowed == single_try and len(single_try) <= 6

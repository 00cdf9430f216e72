"""A week of nights on S3 (moto's server on 127.0.0.1) through the real ``stylid score`` entry, with
``--baseline s3://.../scores/`` (a prefix) and the scoring replaced by hand-built shards (``tests.stub_nights``):
the first night on an empty prefix, a missed night, a failed night, a regression that stays failed until fixed, a
slow drift that fails on the day it crosses the threshold, a lost face and a reordered face list, a rescored old
night; each with the exit code docs/scoring.md promises (0 pass, 1 fail, 3 not gated)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from jobs.cli import main as cli
from jobs.nights import resolve_baseline
from stylid_core.metrics import METRICS_VERSION
from stylid_core.storage import read_bytes, write_bytes
from tests.stub_nights import install_fake_scoring

BUCKET = "nightly-week"


@pytest.fixture
def prefix(s3_endpoint, monkeypatch):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    install_fake_scoring(monkeypatch)
    return f"s3://{BUCKET}/nightly/scores/"


def _night(prefix: str, name: str, offset: float, seed: int, mode: str = "", *extra: str):
    output = f"{prefix}{name}/"
    out = io.StringIO()
    manifest = f"offset:{offset}:{seed}" + (f":{mode}" if mode else "")
    with contextlib.redirect_stdout(out):
        rc = cli(["score", "--manifest", manifest, "--output", output, "--baseline", prefix, "--no-report", *extra])
    info = json.loads(read_bytes(output + "run.json", {}))
    gate = json.loads(read_bytes(output + "gate.json", {})) if info["gate"]["baseline"] else None
    return rc, out.getvalue(), info, gate


def test_a_week_of_nights_on_s3(prefix):
    # the first night: the prefix holds no object yet, which is "no nights", not an error
    rc, out, info, _ = _night(prefix, "2026-12-01", 0.0, 1)
    assert rc == 3 and "NOT GATED (no baseline)" in out and info["gate"]["baseline"] is None
    rc, out, info, _ = _night(prefix, "2026-12-02", 0.0, 2)
    assert rc == 0 and info["gate"]["baseline"] == prefix + "2026-12-01"
    # 12-03 missed; 12-04 crashed after its run.json (no _SUCCESS)
    write_bytes(
        prefix + "2026-12-04/run.json", json.dumps({"job": "score", "metrics_version": METRICS_VERSION}).encode()
    )
    rc, out, info, _ = _night(prefix, "2026-12-05", -0.1, 5)  # a regression
    assert rc == 1 and info["gate"]["baseline"].endswith("2026-12-02") and "2026-12-04 (did not finish)" in out
    rc, out, info, _ = _night(prefix, "2026-12-06", -0.1, 6)  # still regressed: not gated against the failed night
    assert rc == 1 and info["gate"]["baseline"].endswith("2026-12-02") and "2026-12-05 (gate failed)" in out
    rc, out, info, _ = _night(prefix, "2026-12-07", 0.0, 7)  # fixed
    assert rc == 0 and info["gate"]["baseline"].endswith("2026-12-02")
    # a slow drift against the pinned reference 12-02: 0.015 a night passes night over night, fails in total
    reference = prefix + "2026-12-02/"
    rc, out, info, _ = _night(prefix, "2026-12-08", -0.015, 8, "", "--reference", reference)
    assert rc == 0 and info["gate"]["baseline"].endswith("2026-12-07")
    rc, out, info, gate = _night(prefix, "2026-12-09", -0.03, 9, "", "--reference", reference)
    assert rc == 1 and info["gate"]["baseline"].endswith("2026-12-08")
    night = {(c["bucket"], c["figure"]): c["status"] for c in gate["checks"]}
    drift = {(c["bucket"], c["figure"]): c["status"] for c in gate["drift_gate"]["checks"]}
    assert night[("32-48", "id_sim")] == "pass" and drift[("32-48", "id_sim")] == "fail"
    # a reordered face list pairs by geometry: every face paired, nothing lost, the gate passes
    rc, out, info, gate = _night(prefix, "2026-12-10", 0.0, 10, "reordered")
    assert rc == 0 and info["gate"]["baseline"].endswith("2026-12-08")
    assert info["gate"]["failures"] == [] and gate["unpaired_faces"]["count"] == 0
    assert gate["face_pairing"] == [{"bucket": "32-48", "paired": 30, "lost": 0, "new": 0},
                                    {"bucket": "all", "paired": 30, "lost": 0, "new": 0}]  # fmt: skip
    # a lost face (with the list reordered too): exactly one face lost, which fails by the unpaired rule
    rc, out, info, gate = _night(prefix, "2026-12-11", 0.0, 11, "lost+reordered")
    assert rc == 1 and info["gate"]["baseline"].endswith("2026-12-10")
    # 1 of 30 faces (3.3%) is over max_unpaired_share 2%; the other face of img000 still pairs (no index shift)
    # (the baseline 12-10 listed img000's left face, the one lost, as face_index 1)
    assert gate["faces_unpaired_baseline"] == [["img000", 1]] and gate["faces_unpaired_candidate"] == []
    assert gate["face_pairing"][0] == {"bucket": "32-48", "paired": 29, "lost": 1, "new": 0}
    assert "unpaired faces: 1 of 30 (1 lost, 0 new; 3.3%, at most 2.0%)" in gate["failures"]
    night = {(c["bucket"], c["figure"]): c["status"] for c in gate["checks"]}
    assert night[("32-48", "id_sim")] == "pass"  # the figures themselves did not move: the unpaired rule fails it
    rc, out, info, gate = _night(prefix, "2026-12-12", 0.0, 12)  # the face is back
    assert rc == 0 and info["gate"]["baseline"].endswith("2026-12-10")
    # a rescored old night keeps its place: 12-02 is gated against 12-01, not the newest night
    assert resolve_baseline(prefix, prefix + "2026-12-02/", {}).uri.rstrip("/").endswith("2026-12-01")
    rc, out, info, _ = _night(prefix, "2026-12-02", 0.0, 2, "", "--overwrite")
    assert rc == 0 and info["gate"]["baseline"].endswith("2026-12-01")


def test_an_empty_prefix_is_no_nights_only_above_the_output(prefix):
    empty = f"s3://{BUCKET}/nothing-yet/"
    choice = resolve_baseline(empty, empty + "2026-12-01/", {})
    assert choice.uri is None and choice.prefix == empty and "none" in choice.describe()
    with pytest.raises(Exception, match="no readable run.json and no folder of nightly outputs"):
        resolve_baseline(empty, prefix + "2026-12-01/", {})  # a mistyped baseline prefix elsewhere stays an error

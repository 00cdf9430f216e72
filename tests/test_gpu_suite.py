"""``benchmarks/gpu_suite.sh --smoke``: the GPU suite runs end to end on CPU at toy sizes and writes one JSON file
holding every section's figures, with the device it ran on and no GPU figure invented."""

from __future__ import annotations

import json
import numbers
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("styleid", "customize", "train_customizer", "stylize_stage_tiny", "gpu_tests")


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, numbers.Number):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)  # the suite puts the working tree on it itself
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.json", "gpu_suite.log"]
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.log").read_text()


@pytest.mark.slow
def test_smoke_suite_writes_every_section_with_numbers_measured_on_cpu(suite):
    report, log = suite
    assert report["suite"]["mode"] == "smoke"
    assert report["env"]["device_name"] == "cpu" and report["env"]["cuda_available"] is False
    sections = report["sections"]
    for name in MEASURED:
        assert sections[name]["status"] == "ok", (name, sections[name])
        assert sections[name]["seconds"] > 0 and f"=== {name}" in log
        assert _numbers(sections[name]["figures"]), name
    assert sections["stylize_stage_sd15"]["status"] == "skipped"

    styleid = sections["styleid"]["figures"]
    assert styleid["device"] == "cpu" and styleid["dtype"] == "float32" and styleid["torch"]
    assert [m["name"].split(",")[0] for m in styleid["methods"]].count("ours") == 3
    assert all(m["s_per_image"] > 0 and m["passes"] > 0 for m in styleid["methods"])
    official = styleid["methods"][-1]
    assert official["name"].startswith("(b)") and official["dtype"] == "float32"
    # the official flow inverts the style once and each content once, then samples: 3 steps -> 3 + 3 passes each
    assert official["passes"] == pytest.approx(3 / 2 + 6)
    assert styleid["official_content_file_mib"] > 0

    for name in ("customize", "train_customizer"):
        figures = sections[name]["figures"]
        assert figures["synthetic_face"] is True and figures["dtype"] == "float32" and figures["torch"]
    assert sections["customize"]["figures"]["device_name"] == "cpu"
    assert sections["customize"]["figures"]["time_ratio"] > 0
    assert sections["train_customizer"]["figures"]["device"] == "cpu"
    assert sections["train_customizer"]["figures"]["step_s_median"] >= 0

    stage = sections["stylize_stage_tiny"]["figures"]
    assert stage["device_name"] == "cpu" and stage["statuses"] == {"ok": 8}
    assert stage["images_per_s"] > 0 and stage["stage_seconds"] > 0
    # no GPU here: the busy share is reported as unavailable, never guessed
    assert stage["gpu_busy_share"] is None and stage["gpu_busy_share_working"] is None
    assert stage["gpu_busy_source"].startswith("unavailable")

    tests = sections["gpu_tests"]["figures"]
    assert tests["total"] >= 2 and tests["skipped"] == tests["total"]  # every GPU-marked test skips on a CPU

    assert report["targets"] and all(t["applies"] is False for t in report["targets"].values())
    busy = [t for name, t in report["targets"].items() if name.startswith("GPU busy share")]
    assert busy and all(t["value"] is None and t["met"] is None for t in busy)

"""benchmarks/bench_styleid.py runs (at a toy size), so a GPU session is not spent finding it broken."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_styleid.py"


@pytest.mark.slow
def test_bench_styleid_prints_every_row_and_ratio(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_styleid", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--size", "32", "--steps", "3", "--batch", "2", "--n-content", "2", "--strides", "1,3"]
    bench.main([*argv, "--device", "cpu", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("ours, inversion_stride 1", "ours, inversion_stride 3", "(a) img2img strength 1.0, no CFG",
                "(a') img2img defaults: strength 0.8, CFG 7.5", "(b) StyleID official flow"):  # fmt: skip
        assert row in out
    for ratio in ("ours / (a) img2img strict", "ours / (a') img2img defaults", "(b) official / ours"):
        assert ratio in out
    # UNet evaluations counted per image at 3 steps, 2 contents: ours inverts the content (3, or 1 timestep of
    # every 3) and samples 3, plus its share of the style's inversion (3/2, or 1/2); img2img 3, and 2 * int(0.8 * 3)
    # with CFG; the official flow as published inverts the style once too (its share 3/2) and each content (3), then
    # samples (3)
    lines = out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("method"))) + 1 :]
    table = table[: table.index(next(x for x in table if x.startswith("time ratios")))]
    passes = [float(line.split()[-2]) for line in table]  # the columns end: UNet passes/image, dtype
    assert passes == [7.5, 4.5, 3.0, 4.0, 7.5]
    assert all(line.split()[-1] == "float32" for line in table)  # the dtype each method actually ran in

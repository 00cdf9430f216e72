"""Merge the figures of one ``gpu_suite.sh`` run into one JSON file, with the environment and the targets.

``gpu_suite.sh`` leaves, per step, ``<name>.status.json`` (command, cap, exit code, seconds) and, when the step
wrote one, ``<name>.json`` (its benchmark's ``--json`` report) or ``<name>.xml`` (pytest's JUnit report) in one parts
folder. This reads them all and writes::

    {"suite": {...mode, date, budget...}, "env": {...device name, torch, CUDA, packages...},
     "sections": {<name>: {"status", "rc", "seconds", "cap_s", "command", "figures"}},
     "targets": {<target>: {"value", "limit", "met", "applies", "source"}}}

A section's ``status`` is ``ok``, ``failed`` (exit code not 0), ``timeout`` (its cap ran out), ``skipped`` (with a
reason) or ``missing`` (no status file). Targets are computed from the figures only; they ``apply`` only when the
figure was measured on a CUDA device (on a CPU they are printed for the shape of the costs, never as results).

    python benchmarks/gpu_suite_merge.py --parts PARTS_DIR --out OUT/gpu_suite.json --mode gpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ET
from typing import Any

#: the sections gpu_suite.sh runs, in order
SECTIONS = ("styleid", "customize", "train_customizer", "stylize_stage_tiny", "stylize_stage_sd15", "gpu_tests")
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "ray", "numpy", "pyarrow", "nvidia-ml-py")


def read_junit(path: str) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:500]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})  # fmt: skip
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "total": len(cases), "tests": cases}


def read_section(parts: str, name: str) -> dict[str, Any]:
    status_path = os.path.join(parts, f"{name}.status.json")
    if not os.path.exists(status_path):
        return {"status": "missing", "figures": None}
    with open(status_path) as f:
        section = json.load(f)
    rc = section.get("rc")
    if section.get("status") != "skipped":
        section["status"] = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    figures = None
    for ext, reader in ((".json", _read_json), (".xml", read_junit)):
        path = os.path.join(parts, name + ext)
        if os.path.exists(path):
            try:
                figures = reader(path)
            except Exception as exc:  # a half-written file after a timeout: say so
                figures = {"unreadable": f"{type(exc).__name__}: {exc}"}
    section["figures"] = figures
    return section


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def environment() -> dict[str, Any]:
    """What ran: host, Python, package versions, the CUDA device torch sees and the driver nvidia-smi reports."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        env["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()  # fmt: skip
            env["nvidia_smi"] = out
        except Exception as exc:
            env["nvidia_smi"] = f"failed: {type(exc).__name__}: {exc}"
    return env


def _on_cuda(figures: dict | None, key: str = "device_name") -> bool:
    name = str((figures or {}).get(key) or "cpu").lower()
    return not name.startswith("cpu")


def _target(value, limit: float, at_most: bool, applies: bool, source: str) -> dict[str, Any]:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": ("<= " if at_most else ">= ") + f"{limit:g}", "met": met, "applies": applies,
            "source": source}  # fmt: skip


def targets(sections: dict[str, dict]) -> dict[str, Any]:
    """The project's four GPU targets from the figures (None where a figure is missing)."""
    out: dict[str, Any] = {}
    sid = sections.get("styleid", {}).get("figures") or {}
    ratios = sid.get("ratios") or {}
    strict = ratios.get("ours / (a) img2img strict") or {}
    official = ratios.get("(b) official / ours") or {}
    on_gpu = _on_cuda(sid)
    for stride_key in sorted(strict):
        out[f"ours / img2img strict, {stride_key.replace('_', ' ')}"] = _target(
            strict[stride_key], 1.5, True, on_gpu, "styleid.ratios['ours / (a) img2img strict']"
        )
    for stride_key in sorted(official):
        out[f"official flow / ours, {stride_key.replace('_', ' ')}"] = _target(
            official[stride_key], 10.0, False, on_gpu, "styleid.ratios['(b) official / ours']"
        )
    cust = sections.get("customize", {}).get("figures") or {}
    out["facesnap / plain SD time"] = _target(
        cust.get("time_ratio"), 1.3, True, _on_cuda(cust), "customize.time_ratio"
    )
    for name in ("stylize_stage_sd15", "stylize_stage_tiny"):
        stage = sections.get(name, {}).get("figures") or {}
        measured = _on_cuda(stage) and stage.get("gpu_busy_share") is not None
        out[f"GPU busy share in the stylize stage ({name.rsplit('_', 1)[-1]})"] = _target(
            stage.get("gpu_busy_share_working"), 0.9, False, measured,
            f"{name}.gpu_busy_share_working ({stage.get('gpu_busy_source', 'not run')})",
        )  # fmt: skip
    return out


def merge(parts: str, mode: str, budget_s: float | None) -> dict[str, Any]:
    sections = {name: read_section(parts, name) for name in SECTIONS}
    extra = sorted(
        os.path.basename(p)[: -len(".status.json")] for p in glob.glob(os.path.join(parts, "*.status.json"))
    )
    for name in extra:
        if name not in sections:
            sections[name] = read_section(parts, name)
    return {
        "suite": {
            "mode": mode,
            "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s,
            "seconds": sum(float(s.get("seconds") or 0.0) for s in sections.values()),
            "note": "smoke run on CPU at toy sizes: the figures show that every step runs, not GPU performance"
            if mode == "smoke"
            else "GPU run at true shapes (SD 1.5-shaped random weights, 512 px)",
        },
        "env": environment(),
        "sections": sections,
        "targets": targets(sections),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", required=True, help="the folder of per-step files gpu_suite.sh wrote")
    p.add_argument("--out", required=True, help="the merged JSON file")
    p.add_argument("--mode", choices=("gpu", "smoke"), required=True)
    p.add_argument("--budget-s", type=float, default=None)
    args = p.parse_args(argv)
    report = merge(args.parts, args.mode, args.budget_s)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    for name, section in report["sections"].items():
        print(f"  {name:<22} {section['status']:<8} {float(section.get('seconds') or 0):7.1f} s")
    for name, t in report["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "no figure"}[t["met"]]
        note = "" if t["applies"] else " [not measured on a GPU: not a result]"
        print(f"  target {name}: {value} (limit {t['limit']}) {verdict}{note}")
    return report


if __name__ == "__main__":
    main()

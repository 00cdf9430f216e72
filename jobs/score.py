"""``stylid score``: score images that already exist (made by stylid or by anything else), and gate on a baseline.

Exit codes: 0 scored (and, with ``--baseline``, the gate passed); 1 the gate failed; 2 bad input or configuration
(``jobs.cli`` maps ``ConfigError``/``ValueError``, ``GateInputError`` included, to 2); 3 scored, nothing failed, but
nothing could be gated (too few paired faces in every bucket and in ``all``). The baseline is checked
before any scoring, so a baseline that cannot be compared costs no model work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from typing import Any

import pandas as pd

from jobs.config import load_config_dict
from jobs.ray_cluster import init_ray
from jobs.run import check_output_config, versions, write_run_json
from stylid_core import ledger
from stylid_core.config import ScoreJobConfig
from stylid_core.gate import GateConfig, GateInputError, check_comparable, compare_runs, format_gate
from stylid_core.metrics import METRICS_VERSION
from stylid_core.report import format_summary, summarize_output, write_report
from stylid_core.storage import delete, exists, join, read_bytes, write_bytes

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "nightly_score"
EXIT_NOT_GATED = 3


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score existing outputs against their sources; gate on a baseline run")
    p.add_argument("--manifest", required=True, help="Parquet file or prefix of pairs (source_uri, output_uri[,"
                   " image_id, style_uri, reference_uri]), or a stylid output folder")  # fmt: skip
    p.add_argument("--output", required=True, help="output folder or URI for the scores")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"config name in configs/ or a YAML path (default:"
                   f" {DEFAULT_CONFIG})")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value,"
                   " e.g. gate.min_faces=5 or gate.id_sim.abs_drop=0.01")  # fmt: skip
    p.add_argument("--baseline", help="a previous stylid score or stylid run output to compare with (the gate)")
    p.add_argument("--history", metavar="PREFIX", help="folder of previous nightly score outputs: report.html"
                   " gains trend plots over the last gate.history_runs of them")  # fmt: skip
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--overwrite", action="store_true", help="start over in an output written with another config")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=main)


def load_score_config(name_or_path: str, overrides: list[str] | None = None) -> tuple[ScoreJobConfig, GateConfig]:
    """The scoring config and the gate's thresholds (its ``gate:`` section) from one YAML plus ``--set``."""
    from jobs.config import resolve_config_path

    data = load_config_dict(resolve_config_path(name_or_path), overrides)
    gate = data.pop("gate", None)
    return ScoreJobConfig.from_dict(data), GateConfig.from_dict(gate)


def read_baseline(uri: str, storage_options: dict) -> dict[str, Any]:
    """The baseline's ``run.json``; ``GateInputError`` when it is not a finished stylid output."""
    try:
        info = json.loads(read_bytes(join(uri, "run.json"), storage_options))
    except Exception as exc:
        raise GateInputError(f"baseline {uri}: no readable run.json ({exc}); is it a stylid output?") from None
    if not exists(join(uri, "_SUCCESS"), storage_options):
        raise GateInputError(f"baseline {uri} has no _SUCCESS: that run did not finish")
    return info


def _config_record(config: ScoreJobConfig) -> dict[str, Any]:
    record = config.to_dict()
    record["io"].pop("storage_options", None)  # may hold credentials
    return record


def run_score_job(
    config: ScoreJobConfig,
    gate_config: GateConfig,
    manifest_uri: str,
    output_uri: str,
    baseline_uri: str | None = None,
    history_prefix: str | None = None,
    overwrite: bool = False,
    report: bool = True,
) -> dict[str, Any]:
    """The whole job on an initialised Ray, with ``stylid run``'s guarantees (refuse an output of another config
    unless ``overwrite``; score only the rows not yet in ``metrics/``; ``run.json`` and ``_SUCCESS`` last), then the
    gate against ``baseline_uri`` (``gate.json``) and ``report.html`` (with trend plots over ``history_prefix``).
    Returns the content of ``run.json``; with a baseline, ``info["gate"]`` holds the verdict and
    ``info["gate_result"]`` every figure."""
    from pipelines.score import run_score

    opts = config.io.storage_options
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    record = {"job": "score", "metrics_version": METRICS_VERSION, "config": _config_record(config)}
    baseline_info = None
    if baseline_uri:
        baseline_info = read_baseline(baseline_uri, opts)
        check_comparable(record, baseline_info, baseline_uri)
    check_output_config(output_uri, config, overwrite)
    for name in ("_SUCCESS", "gate.json"):
        delete(join(output_uri, name), opts)
    result = run_score(config, manifest_uri, output_uri)
    metrics = ledger.read_frame(output_uri, ledger.METRICS, opts)
    faces = ledger.read_frame(output_uri, ledger.FACES, opts)
    info: dict[str, Any] = {
        **record,
        "manifest": manifest_uri,
        "output": output_uri,
        "config_hash": config.config_hash(),
        "versions": versions(),
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "this_run": result.to_dict(),
        "summary": summarize_output(output_uri, opts),
    }
    gate = None
    if baseline_info is not None:
        gate = gate_against(metrics, faces, baseline_uri, baseline_info, gate_config, opts)
        changed = versions_changed(baseline_info.get("versions") or {}, info["versions"])
        gate = {"baseline": baseline_uri, "candidate": output_uri, **gate, "versions_changed": changed}
        write_bytes(join(output_uri, "gate.json"), json.dumps(gate, indent=2, default=str).encode(), opts)
        info["gate"] = {"baseline": baseline_uri, "passed": gate["passed"], "failures": gate["failures"]}
    write_run_json(output_uri, info, opts)
    if report and len(metrics):
        info["report"] = write_report(output_uri, opts, extra_html=_nightly_html(info, gate, history_prefix,
                                                                                gate_config, opts))  # fmt: skip
    write_bytes(join(output_uri, "_SUCCESS"), b"", opts)
    if gate is not None:
        info["gate_result"] = gate
    return info


def gate_against(
    metrics: pd.DataFrame,
    faces: pd.DataFrame,
    baseline_uri: str,
    baseline_info: dict[str, Any],
    gate_config: GateConfig,
    storage_options: dict,
) -> dict[str, Any]:
    """``compare_runs`` of this output's tables against the baseline's (also refused when its face rows name
    another backend than its run.json's config, e.g. an output edited by hand)."""
    base_metrics = ledger.read_frame(baseline_uri, ledger.METRICS, storage_options)
    base_faces = ledger.read_frame(baseline_uri, ledger.FACES, storage_options)
    if base_metrics.empty:
        raise GateInputError(f"baseline {baseline_uri} has no metrics shards")
    backends = {str(b) for b in base_faces.get("backend", pd.Series(dtype=str)).dropna().unique()}
    here = {str(b) for b in faces.get("backend", pd.Series(dtype=str)).dropna().unique()}
    if backends and here and backends != here:
        raise GateInputError(f"baseline {baseline_uri} has faces scored by {sorted(backends)}, this run by"
                             f" {sorted(here)}: not comparable")  # fmt: skip
    return compare_runs(metrics, faces, base_metrics, base_faces, gate_config)


def versions_changed(before: dict[str, str], after: dict[str, str]) -> dict[str, list]:
    """Packages whose version differs between the baseline and this run (what a nightly gate most often explains)."""
    names = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in names if before.get(k) != after.get(k)}


def _nightly_html(
    info: dict, gate: dict | None, history_prefix: str | None, gate_config: GateConfig, storage_options: dict
) -> str:
    from stylid_core.nightly_report import gate_section_html, history_section_html, read_history

    parts = []
    if gate is not None:
        parts.append(gate_section_html(gate, gate["baseline"]))
    if history_prefix:
        nights = read_history(history_prefix, info, info["output"], gate_config.history_runs, storage_options)
        parts.append(history_section_html(nights))
    return "\n".join(parts)


def main(args: argparse.Namespace) -> int:
    config, gate_config = load_score_config(args.config, args.set)
    if args.baseline:  # bad baselines are refused before Ray starts
        check_comparable({"job": "score", "metrics_version": METRICS_VERSION, "config": _config_record(config)},
                         read_baseline(args.baseline, config.io.storage_options), args.baseline)  # fmt: skip
    from pipelines.score import iter_score_manifest

    # the manifest's schema read before Ray starts: a missing manifest, column or a nested column fails in one line
    iter_score_manifest(args.manifest, config.style_uri, config.io.storage_options)
    init_ray(args.address, args.num_cpus)
    info = run_score_job(config, gate_config, args.manifest, args.output, args.baseline, args.history,
                         overwrite=args.overwrite, report=not args.no_report)  # fmt: skip
    r = info["this_run"]
    print()
    print(f"stylid score: {r['total_rows']} rows in the manifest, {r['already_done']} already done, "
          f"{r['processed']} scored in {r['seconds']:.1f} s ({r['images_per_second']:.2f} images/s)")  # fmt: skip
    print(format_summary(info["summary"]))
    print(f"output: {args.output}" + (f"  report: {info['report']}" if "report" in info else ""))
    gate = info.get("gate_result")
    if gate is None:
        return 0
    print()
    print(f"baseline: {args.baseline}")
    if gate["versions_changed"]:
        print("versions changed: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in gate["versions_changed"].items()))
    print(format_gate(gate))
    print(f"gate.json: {join(args.output, 'gate.json')}")
    if not gate["passed"]:
        return 1
    return 0 if gate["gated"] else EXIT_NOT_GATED

"""``stylid score``: score images that already exist (made by stylid or by anything else), and gate on a baseline.

Exit codes: 0 scored (and, with ``--baseline``, the gate passed); 1 the gate failed; 2 bad input or configuration
(``jobs.cli`` maps ``ConfigError``/``ValueError``, ``GateInputError`` included, to 2); 3 scored, nothing failed, but
nothing could be gated (too few paired faces in every bucket and in ``all``). The baseline is checked
before any scoring, so a baseline that cannot be compared costs no model work.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import pandas as pd

from jobs.config import add_config_arguments, add_output_arguments, add_ray_arguments, load_config
from jobs.nights import BaselineChoice, choose_drift_base, read_baseline, resolve_baseline
from jobs.output import (
    OpenOutput,
    check_output_config,
    check_writable,
    close_output,
    config_record,
    open_output,
    versions,
)
from jobs.ray_cluster import init_ray
from stylid_core import ledger
from stylid_core.config import ScoreJobConfig
from stylid_core.gate import (
    GateConfig,
    GateInputError,
    canary_warning,
    check_comparable,
    compare_runs,
    format_gate,
    median_night,
)
from stylid_core.metrics import METRICS_VERSION
from stylid_core.report import format_summary, summarize_output, write_report
from stylid_core.storage import join, write_bytes

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "nightly_score"
EXIT_NOT_GATED = 3


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score existing outputs against their sources; gate on a baseline run")
    p.add_argument("--manifest", required=True, help="Parquet file or prefix of pairs (source_uri, output_uri[,"
                   " image_id, style_uri, reference_uri]), or a stylid output folder")  # fmt: skip
    add_output_arguments(p)
    add_config_arguments(p, default=DEFAULT_CONFIG, what=" (its gate: section: e.g. --set gate.min_faces=5)")
    p.add_argument("--baseline", help="a previous stylid score or stylid run output to compare with (the gate),"
                   " or a folder of nightly score outputs (PREFIX/): the newest finished night before this one"
                   " (by night name) whose gate passed")  # fmt: skip
    p.add_argument("--reference", metavar="URI", help="a pinned reference output: every figure is also gated"
                   " against it, so a slow drift fails once it crosses the thresholds in total")  # fmt: skip
    p.add_argument("--history", metavar="PREFIX", help="folder of previous nightly score outputs: report.html"
                   " gains trend plots over the last gate.history_runs of them")  # fmt: skip
    add_ray_arguments(p)
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=main)


def preflight_score(config: ScoreJobConfig, manifest_uri: str, output_uri: str) -> None:
    """Everything ``stylid score`` can check before Ray: the manifest (its schema, through the reader the job
    uses: a missing manifest, a missing or nested column; then one pass over its ids, unique) and the output
    (writable). Each failure is one ``PreflightError`` line naming the URI, exit 2."""
    from pipelines.preflight import PreflightError
    from pipelines.score import iter_score_manifest

    try:
        iter_score_manifest(manifest_uri, config.style_uri, config.io.storage_options).scan_ids()
    except PreflightError:
        raise
    except (ValueError, OSError) as exc:
        text = str(exc)
        raise PreflightError(text if manifest_uri in text else f"manifest {manifest_uri}: {text}") from None
    check_writable(output_uri, config.io)


def _record(config: ScoreJobConfig) -> dict[str, Any]:
    """What a gate compares of this run with its baseline's ``run.json`` (``OpenOutput.record``)."""
    return {"job": "score", "metrics_version": METRICS_VERSION, "config": config_record(config)}


def run_score_job(
    config: ScoreJobConfig,
    gate_config: GateConfig,
    manifest_uri: str,
    output_uri: str,
    baseline_uri: str | None = None,
    history_prefix: str | None = None,
    overwrite: bool = False,
    report: bool = True,
    reference_uri: str | None = None,
) -> dict[str, Any]:
    """The whole job on an initialised Ray, with ``stylid run``'s guarantees (refuse an output of another config
    unless ``overwrite``; score only the rows not yet in ``metrics/``; ``run.json`` and ``_SUCCESS`` last), then the
    gate (``gate.json``) against ``baseline_uri`` (an output, or a folder of nights: ``resolve_baseline``) and the
    pinned ``reference_uri``, and ``report.html`` (with trend plots over ``history_prefix``).
    Returns the content of ``run.json``; with a baseline or reference, ``info["gate"]`` holds the verdict and which
    baseline was used, and ``info["gate_result"]`` every figure (``None`` when a prefix held no baseline)."""
    from pipelines.score import run_score

    opts = config.io.storage_options
    record = _record(config)
    choice = resolve_baseline(baseline_uri, output_uri, opts) if baseline_uri else None
    targets = gate_targets(record, choice, reference_uri, opts)
    drift = choose_drift_base(record, choice, reference_uri, gate_config.history_runs)
    out: OpenOutput = open_output("score", config, output_uri, overwrite, clear=("gate.json",))
    result = run_score(config, manifest_uri, output_uri)
    metrics = ledger.read_frame(output_uri, ledger.METRICS, opts)
    faces = ledger.read_frame(output_uri, ledger.FACES, opts)
    info: dict[str, Any] = {"manifest": manifest_uri, "this_run": result.to_dict(),
                            "summary": summarize_output(output_uri, opts)}  # fmt: skip
    this_versions = versions()
    gate = None
    if targets:
        results = {}
        for role, (uri, target_info) in targets.items():
            result_of = gate_against(metrics, faces, uri, target_info, gate_config, opts)
            changed = versions_changed(target_info.get("versions") or {}, this_versions)
            results[role] = {**result_of, "versions_changed": changed}
        if drift.kind == "median":
            results["reference"] = median_drift_gate(metrics, faces, drift.nights, gate_config, opts)
        gate = combine_gates(results.get("baseline"), results.get("reference"), drift.describe())
        gate = {"baseline": targets["baseline"][0] if "baseline" in targets else None, "reference": reference_uri,
                "drift_base": drift.to_dict(), "candidate": output_uri, **gate}  # fmt: skip
        write_bytes(join(output_uri, "gate.json"), json.dumps(gate, indent=2, default=str).encode(), opts)
    if choice is not None or reference_uri:
        info["gate"] = {
            "baseline": gate["baseline"] if gate else None,
            "reference": reference_uri,
            "baseline_used": choice.describe() if choice else None,
            "baseline_choice": choice.to_dict() if choice else None,
            "drift_base": drift.to_dict(),
            "passed": gate["passed"] if gate else True,  # no baseline under the prefix: nothing failed (exit 3)
            "gated": gate["gated"] if gate else False,
            "failures": gate["failures"] if gate else [],
        }

    def write_the_report(run_json: dict[str, Any]) -> str:
        return write_report(output_uri, opts, extra_html=_nightly_html(run_json, gate, history_prefix, gate_config,
                                                                       opts))  # fmt: skip

    info = close_output(out, info, write_the_report if report and len(metrics) else None)
    if "gate" in info:
        info["gate_result"] = gate
    return info


def gate_targets(
    record: dict[str, Any], choice: BaselineChoice | None, reference_uri: str | None, storage_options: dict
) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{"baseline": (uri, run.json), "reference": (uri, run.json)}`` of what this night is gated against, each
    checked to be a finished output comparable with this run (``GateInputError`` otherwise). The reference is left
    out when it is the baseline itself."""
    targets = {}
    if choice is not None and choice.uri is not None:
        targets["baseline"] = (choice.uri, read_baseline(choice.uri, storage_options))
    if reference_uri and (choice is None or choice.uri is None or choice.uri.rstrip("/") != reference_uri.rstrip("/")):
        targets["reference"] = (reference_uri, read_baseline(reference_uri, storage_options))
    for uri, target_info in targets.values():
        check_comparable(record, target_info, uri)
    return targets


def combine_gates(night: dict[str, Any] | None, drift: dict[str, Any] | None, drift_described: str) -> dict:
    """One verdict of the night-over-night gate and the drift gate (against ``drift_described``: the pinned
    reference or the median of the last passing nights): the night's result (or the drift's, when there is no
    night), failing when either fails, with the drift's failures named as such ("against the reference ...: ") and
    its whole result under ``drift_gate``."""
    if night is None:
        assert drift is not None
        return {**drift, "gated_against": drift_described, "drift_gate": None}
    if drift is None:
        return {**night, "gated_against": "baseline", "drift_gate": None}
    return {
        **night,
        "gated_against": f"baseline and {drift_described}",
        "passed": night["passed"] and drift["passed"],
        "gated": night["gated"] or drift["gated"],
        "failures": [*night["failures"], *(f"against {drift_described}: {f}" for f in drift["failures"])],
        "drift_gate": drift,
    }


def median_drift_gate(
    metrics: pd.DataFrame, faces: pd.DataFrame, nights: list[str], gate_config: GateConfig, storage_options: dict
) -> dict[str, Any]:
    """``compare_runs`` of this output against ``median_night`` of ``nights`` (newest first): the drift gate when no
    reference is pinned."""
    tables = [(ledger.read_frame(uri, ledger.METRICS, storage_options),
               ledger.read_frame(uri, ledger.FACES, storage_options)) for uri in nights]  # fmt: skip
    base_metrics, base_faces = median_night(tables, gate_config.pair_iou)
    return compare_runs(metrics, faces, base_metrics, base_faces, gate_config)


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
        parts.append(gate_section_html(gate, gate["baseline"] or gate["reference"]))
    if history_prefix:
        nights = read_history(history_prefix, info, info["output"], gate_config.history_runs, storage_options)
        parts.append(history_section_html(nights))
    return "\n".join(parts)


def main(args: argparse.Namespace) -> int:
    config, gate_config = load_config("score", args.config, args.set)
    opts = config.io.storage_options
    if args.baseline or args.reference:  # bad baselines are refused before Ray starts
        record = _record(config)
        choice = resolve_baseline(args.baseline, args.output, opts) if args.baseline else None
        targets = gate_targets(record, choice, args.reference, opts)
        if choice is not None:
            print(f"baseline: {choice.describe()}")
        print(f"drift base: {choose_drift_base(record, choice, args.reference, gate_config.history_runs).describe()}")
        for uri, target_info in list(targets.values())[:1]:  # the canary's faces per bucket, as the baseline has them
            warning = canary_warning((target_info.get("summary") or {}).get("buckets") or [], gate_config, uri)
            if warning:
                print(warning)
    preflight_score(config, args.manifest, args.output)  # before Ray starts: a bad input fails in one line
    check_output_config(args.output, config, args.overwrite, "score")  # the job checks again: then a no-op
    init_ray(args.address, args.num_cpus)
    info = run_score_job(config, gate_config, args.manifest, args.output, args.baseline, args.history,
                         overwrite=args.overwrite, report=not args.no_report,
                         reference_uri=args.reference)  # fmt: skip
    r = info["this_run"]
    print()
    print(f"stylid score: {r['total_rows']} rows in the manifest, {r['already_done']} already done, "
          f"{r['processed']} scored in {r['seconds']:.1f} s ({r['images_per_second']:.2f} images/s)")  # fmt: skip
    print(format_summary(info["summary"]))
    print(f"output: {args.output}" + (f"  report: {info['report']}" if "report" in info else ""))
    if "gate" not in info:
        return 0
    gate = info["gate_result"]
    print()
    print(f"baseline: {info['gate']['baseline_used'] or '-'}")
    print(f"drift base: {info['gate']['drift_base']['described']}")
    if gate is None:
        print("gate: NOT GATED (no baseline)")
        return EXIT_NOT_GATED
    if gate["versions_changed"]:
        print("versions changed: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in gate["versions_changed"].items()))
    print(format_gate(gate))
    if gate["drift_gate"] is not None:
        print()
        print(f"against {info['gate']['drift_base']['described']}:")
        print(format_gate(gate["drift_gate"]))
    print(f"gate.json: {join(args.output, 'gate.json')}")
    if not gate["passed"]:
        return 1
    return 0 if gate["gated"] else EXIT_NOT_GATED

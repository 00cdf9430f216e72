"""Which nights a night of ``stylid score`` is gated against: the baseline under a prefix (the newest earlier
finished night whose gate passed, of this metrics version; ``choose_baseline`` is the rule, pure), and the drift
base (a pinned ``--reference``, else the median of the last passing nights). ``jobs.score`` runs the job."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from jobs.output import read_finished_run
from stylid_core.gate import GateInputError, check_comparable
from stylid_core.metrics import METRICS_VERSION
from stylid_core.storage import exists, filesystem, join, read_bytes


def read_baseline(uri: str, storage_options: dict) -> dict[str, Any]:
    """The baseline's ``run.json``; ``GateInputError`` when it is not a finished stylid output."""
    return read_finished_run(uri, storage_options, "baseline", GateInputError)


def night_name(uri: str) -> str:
    """A night's name: the last part of its output URI (e.g. ``2026-12-07`` of ``s3://b/scores/2026-12-07/``)."""
    return posixpath.basename(uri.rstrip("/"))


def _passed_over(night: dict[str, Any], metrics_version: int) -> str | None:
    """Why a night cannot be a baseline (``None``: it can): it did not finish, is another job's output, was written
    with another metrics version, or its gate failed."""
    info = night.get("info")
    if not night.get("success") or info is None:
        return "did not finish"
    if info.get("job", "run") not in ("run", "score"):
        return f"a stylid {info.get('job')} output"
    if info.get("metrics_version", 1) != metrics_version:
        return f"metrics version {info.get('metrics_version', 1)}"
    if (info.get("gate") or {}).get("passed", True) is not True:
        return "gate failed"
    return None


def passing_nights(nights: list[dict[str, Any]], current: str, metrics_version: int) -> list[str]:
    """The names of the nights before ``current`` that could be its baseline (``choose_baseline``'s rule), newest
    first: the nights whose median is the drift base when no reference is pinned."""
    earlier = sorted((n for n in nights if n["name"] < current), key=lambda n: n["name"], reverse=True)
    return [n["name"] for n in earlier if _passed_over(n, metrics_version) is None]


def choose_baseline(nights: list[dict[str, Any]], current: str, metrics_version: int) -> tuple[str | None, list[str]]:
    """The baseline night for night ``current``: the newest, by night name, of the nights before it (names that sort
    before ``current``) that finished (``success`` and a ``run.json``, as ``info``), were written with
    ``metrics_version`` and whose gate passed (``gate.passed`` true, or no gate). A missed night, a night whose gate
    failed and a rescore of an old night thus all leave the next night gated against the last good one; a night
    after a FAIL stays failed until its figures are back. ``nights``: ``{"name", "success", "info"}`` each.
    Returns the chosen name (``None`` when no night qualifies) and why each newer night was passed over."""
    skipped = []
    for night in sorted(nights, key=lambda n: n["name"], reverse=True):
        if night["name"] >= current:
            continue
        why = _passed_over(night, metrics_version)
        if why is None:
            return night["name"], skipped
        skipped.append(f"{night['name']} ({why})")
    return None, skipped


@dataclass
class BaselineChoice:
    """Which baseline ``--baseline`` resolved to: the output itself, or the night chosen under a prefix."""

    requested: str
    uri: str | None  # None: a prefix without a night that qualifies
    prefix: str | None = None  # set when ``requested`` was a folder of nights
    skipped: list[str] = field(default_factory=list)
    passing: list[str] = field(default_factory=list)  # under a prefix: nights that could be baselines, newest first
    infos: dict[str, dict] = field(default_factory=dict, repr=False)  # their run.json, by URI

    def describe(self) -> str:
        if self.prefix is None:
            return str(self.uri)
        skipped = f"; passed over: {', '.join(self.skipped)}" if self.skipped else ""
        if self.uri is None:
            return f"none: no finished night whose gate passed under {self.prefix}{skipped}"
        return (f"{self.uri} (the newest finished night before this one whose gate passed, under {self.prefix}"
                f"{skipped})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "uri": self.uri, "prefix": self.prefix, "skipped": self.skipped}


def _list_nights(prefix: str, storage_options: dict) -> list[dict[str, Any]] | None:
    """The folders under ``prefix`` as nights (``name``, ``success``, ``info``); ``None`` when it is no folder."""
    fs, path = filesystem(prefix, storage_options)
    try:
        entries = fs.ls(path, detail=True, refresh=True) if fs.isdir(path) else None
    except FileNotFoundError:
        entries = None
    if entries is None:
        return None
    nights = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        uri = join(prefix, name)
        success = exists(join(uri, "_SUCCESS"), storage_options)
        try:
            info = json.loads(read_bytes(join(uri, "run.json"), storage_options)) if success else None
        except Exception:
            info = None
        nights.append({"name": name, "success": success, "info": info})
    return nights


def _lies_under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` is inside the folder ``prefix`` (``s3://b/scores/n01/`` under ``s3://b/scores/``)."""
    return uri.rstrip("/").startswith(prefix.rstrip("/") + "/")


def resolve_baseline(uri: str, output_uri: str, storage_options: dict) -> BaselineChoice:
    """``--baseline``: an output (it has a ``run.json``) is the baseline itself; a folder of nights (no
    ``run.json`` of its own) gives the night ``choose_baseline`` picks before ``output_uri``'s night. A prefix that
    does not exist (on an object store: holds no object yet) is a folder of no nights when ``output_uri`` lies under
    it (the first night: no baseline, exit 3), else ``GateInputError``."""
    if exists(join(uri, "run.json"), storage_options):
        return BaselineChoice(requested=uri, uri=uri)
    nights = _list_nights(uri, storage_options)
    if nights is None and _lies_under(output_uri, uri):
        nights = []  # an object store has no empty folders: a prefix with no object yet, above --output, is no nights
    if nights is None:
        raise GateInputError(
            f"baseline {uri}: no readable run.json and no folder of nightly outputs; is it a stylid output?"
        )
    name, skipped = choose_baseline(nights, night_name(output_uri), METRICS_VERSION)
    passing = [join(uri, n) for n in passing_nights(nights, night_name(output_uri), METRICS_VERSION)]
    infos = {join(uri, n["name"]): n["info"] for n in nights}
    return BaselineChoice(requested=uri, uri=None if name is None else join(uri, name), prefix=uri, skipped=skipped,
                          passing=passing, infos=infos)  # fmt: skip


@dataclass
class DriftBase:
    """What each figure is also gated against, for drift: the pinned ``--reference``, else (with ``--baseline
    PREFIX/``) the median of the last ``gate.history_runs`` passing nights, the baseline first."""

    kind: str  # "reference", "median" or "none"
    nights: list[str] = field(default_factory=list)  # the reference, or the nights of the median
    skipped: list[str] = field(default_factory=list)  # passing nights left out: scored another way

    def describe(self) -> str:
        if self.kind == "reference":
            return f"the reference {self.nights[0]}"
        left_out = f"; left out: {', '.join(self.skipped)}" if self.skipped else ""
        if self.kind == "median":
            names = ", ".join(map(night_name, self.nights))
            return f"the median of the last {len(self.nights)} passing nights ({names}{left_out})"
        return f"none (a drift base needs --reference, or --baseline PREFIX/ with two passing nights{left_out})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nights": self.nights, "skipped": self.skipped, "described": self.describe()}


def choose_drift_base(
    record: dict[str, Any], choice: BaselineChoice | None, reference_uri: str | None, runs: int
) -> DriftBase:
    """The drift base of this night (``DriftBase``): a median needs two or more passing nights comparable with this
    run (a night scored another way is left out, named in ``skipped``); with one there is nothing beyond the
    night-over-night gate."""
    if reference_uri:
        return DriftBase("reference", [reference_uri])
    if choice is None or choice.prefix is None or choice.uri is None:
        return DriftBase("none")
    nights, skipped = [], []
    for uri in choice.passing:
        if len(nights) == runs:
            break
        try:
            check_comparable(record, choice.infos[uri], uri)
        except GateInputError:
            skipped.append(f"{night_name(uri)} (scored another way)")
            continue
        nights.append(uri)
    return DriftBase("median", nights, skipped) if len(nights) >= 2 else DriftBase("none", [], skipped)

"""Faces that stay painted: identity kept per face size, judged by two recognizers, against how much of each face
is the photo's own detail, with the halo around faces, the whole image's learned style distance and the cost.

Data: the 14 people of ``../shared/faces`` (``$STYLID_FACES_DIR``): its scenes (faces pasted at 24-96 px, truth
boxes in ``scenes/truth.json``) and its VOC group photos with hand-annotated boxes, stylized after the paintings of
``../shared/styles`` (``$STYLID_STYLES_DIR``). Neither folder is part of the project; what the benchmark writes
from them goes to ``benchmarks/results/`` (ignored by git), the contact sheet included.

Recognizers: dlib (ResNet, euclidean distance, match under 0.6) and MobileFaceNet through the insightface backend
(``../shared/models/insightface_small``, ``$STYLID_TEST_MODELS``; cosine distance, calibrated threshold). On the
scenes each face is compared with the person's full-resolution photo, at that recognizer's keypoints of the photo
mapped into the scene through the truth box; on the group photos with the face unstylized (dlib: its 5-point
model on the annotated box; MobileFaceNet: SCRFD's detection over the box, faces it misses are left out).

Variants: ``plain`` (the engine alone: no mosaic, no face detail, no face style strength), ``default`` (the
``stylize`` section of ``configs/default.yaml``, as ``stylid run`` builds it), and any ``--variant NAME=JSON`` of
dotted overrides of that section, e.g. ``--variant 'fs0.4={"options.face_style_strength": 0.4}'``.

Per variant, painting, recognizer and face size: ``recovered``, the share of plain's identity loss won back,
``(d_plain - d) / (d_plain - d_floor)`` with ``d_floor`` the unstylized scene's distance; ``match``, the match
rate; and per face size the photo-detail correlations (``stylid_core.metrics.photo_detail_correlation``: 1.0 is
the photo's detail copied). Per image: ``halo`` (``stylid_core.metrics.face_halo``), the mean absolute change
from plain (0-255) in the ring around the faces, from each box grown by 50% to grown by 200%; ``style``, the
learned style distance (``stylid_core.style_judge``) against plain's; and the seconds per image against plain's.
Then one target line per target of the issue, ``ok`` or ``MISS`` by how much.

    python benchmarks/bench_identity.py                                  # plain and default, all three paintings
    python benchmarks/bench_identity.py --per-size 2 --styles starry_night \
        --variant 'fs0.7={"options.face_style_strength": 0.7}'
    python benchmarks/bench_identity.py --readme-figure docs/group_scene_neural.jpg   # from the bundled sample
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from stylid_core.config import FacesConfig, JobConfig, StylizeConfig
from stylid_core.faces import Face, create_face_analyzer
from stylid_core.metrics import face_halo, photo_detail_correlation
from stylid_core.style_judge import StyleJudge
from stylid_core.stylize import STYLIZERS, Stylizer
from stylid_core.stylize.face_detail import FaceDetailTransfer
from stylid_core.stylize.mosaic import MosaicRestorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES_DIR = os.environ.get("STYLID_FACES_DIR", os.path.join(ROOT, "..", "shared", "faces"))
STYLES_DIR = os.environ.get("STYLID_STYLES_DIR", os.path.join(ROOT, "..", "shared", "styles"))
MODELS_DIR = os.environ.get("STYLID_TEST_MODELS", os.path.join(ROOT, "..", "shared", "models"))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SIZES = (24, 32, 48, 64, 96)
#: the issue's table: (face sizes, scene sizes and group bucket it covers, recovered >=, match >=)
TARGETS = (("24-48 px", (24, 32, 48), "<48px", 0.80, 0.95), ("64-96 px", (64, 96), ">=48px", 0.70, 1.0))
DETAIL_MAX = 0.90  # fine and mid photo-detail correlation
HALO_MAX = 2.0  # mean absolute change from plain in the ring around the faces (face_halo), 0-255
STYLE_MAX = 0.03  # whole image's learned style distance within 3% of plain's
COST_MAX = 2.0  # seconds per image, times plain's


def _rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@dataclass
class Case:
    """One image: its faces (truth boxes), and per recognizer each face's keypoints and reference embedding (None
    where that recognizer has no keypoints for the face)."""

    name: str
    image: np.ndarray
    boxes: list[tuple[float, float, float, float]]
    sizes: list[int]
    kind: str  # scene | group
    keypoints: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    references: dict[str, list[np.ndarray | None]] = field(default_factory=dict)

    #: per recognizer, each face's embedding in the unstylized image itself (``source_embeddings``)
    own: dict[str, list[np.ndarray | None]] = field(default_factory=dict)

    def source_embeddings(self, name: str, analyzer) -> list[np.ndarray | None]:
        """Each face's embedding in this image by ``analyzer``, as ``stylid run``'s face stage gives the stylize
        stage (computed once, outside the timed stylization)."""
        if name not in self.own:
            kps = self.keypoints[name]
            have = [k for k in kps if k is not None]
            embs = iter(analyzer.embed(self.image, have)) if have else iter(())
            self.own[name] = [next(embs) if k is not None else None for k in kps]
        return self.own[name]

    def faces(self, recognizer: str = "dlib") -> list[Face]:
        """The faces as the stylizers get them, with ``recognizer``'s keypoints and its embedding of each face here
        (``source_embeddings``, where computed: the mosaic's closed loop judges with them; the rest of the chain
        uses only the boxes)."""
        kps = self.keypoints[recognizer]
        embs = self.own.get(recognizer, [None] * len(kps))
        return [Face(box=b, keypoints=k if k is not None else np.zeros((5, 2), np.float32), score=1.0, embedding=e)
                for b, k, e in zip(self.boxes, kps, embs)]  # fmt: skip


def recognizers() -> dict:
    """name -> analyzer: dlib always, MobileFaceNet where the shared models are."""
    out = {"dlib": create_face_analyzer(FacesConfig(backend="dlib", upsample=1))}
    small = os.path.join(MODELS_DIR, "insightface_small")
    if os.path.isfile(os.path.join(small, "mobilefacenet.onnx")):
        out["mobilefacenet"] = create_face_analyzer(FacesConfig(backend="insightface", model_dir=small))
    else:
        print(f"MobileFaceNet not found in {small} (STYLID_TEST_MODELS): dlib only")
    return out


def _iou(a, b) -> float:
    from stylid_core.boxes import box_iou

    return box_iou(a, b)


def load_cases(analyzers: dict, faces_dir: str = FACES_DIR, groups: bool = True) -> list[Case]:
    import dlib

    from stylid_core.faces.dlib_backend import default_model_dir

    truth = json.load(open(os.path.join(faces_dir, "scenes", "truth.json")))
    photos: dict[tuple[str, str], Face | None] = {}
    cases = []
    for scene, entries in sorted(truth.items()):
        image = _rgb(os.path.join(faces_dir, "scenes", scene))
        case = Case(scene, image, [tuple(float(v) for v in e["box"]) for e in entries],
                    [int(e["size"]) for e in entries], "scene")  # fmt: skip
        for name, analyzer in analyzers.items():
            kps, refs = [], []
            for e in entries:
                key = (name, e["source"])
                if key not in photos:
                    found = analyzer.analyze(_rgb(os.path.join(faces_dir, e["source"])), max_faces=1)
                    photos[key] = found[0] if found else None
                photo = photos[key]
                if photo is None:
                    kps.append(None)
                    refs.append(None)
                    continue
                sx0, sy0, sx1, sy1 = e["source_box"]
                side = ((sx1 - sx0) + (sy1 - sy0)) / 2
                ox, oy = (sx0 + sx1) / 2 - side / 2, (sy0 + sy1) / 2 - side / 2
                s = e["size"] / side
                kps.append(
                    ((np.asarray(photo.keypoints, np.float32) - [ox, oy]) * s + e["box"][:2]).astype(np.float32)
                )
                refs.append(photo.embedding)
            case.keypoints[name], case.references[name] = kps, refs
        cases.append(case)
    if not groups:
        return cases
    shape = dlib.shape_predictor(os.path.join(default_model_dir(), "shape_predictor_5_face_landmarks.dat"))
    info = json.load(open(os.path.join(faces_dir, "groups", "faces.json")))
    for gname, meta in sorted(info.items()):
        if not meta.get("annotated_boxes"):
            continue
        image = _rgb(os.path.join(faces_dir, "groups", gname))
        boxes = [tuple(float(v) for v in b) for b in meta["annotated_boxes"]]
        case = Case(gname, image, boxes, [round(max(b[2] - b[0], b[3] - b[1])) for b in boxes], "group")
        for name, analyzer in analyzers.items():
            if name == "dlib":
                kps = []
                for x0, y0, x1, y1 in boxes:
                    parts = shape(image, dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1)).parts()
                    kps.append(np.array([[p.x, p.y] for p in parts], dtype=np.float32))
            else:
                found = analyzer.detect(image)
                kps = []
                for b in boxes:
                    best = max(found, key=lambda f: _iou(f.box, b), default=None)
                    kps.append(best.keypoints if best is not None and _iou(best.box, b) >= 0.3 else None)
            have = [k for k in kps if k is not None]
            embs = iter(analyzer.embed(image, have)) if have else iter(())
            case.keypoints[name] = kps
            case.references[name] = [next(embs) if k is not None else None for k in kps]
        cases.append(case)
    return cases


def build_chain(stylize: StylizeConfig, recognizer=None) -> Stylizer:
    """The stylizer ``stylid run`` builds from a ``stylize`` section (``pipelines.stages.StylizeStage``);
    ``recognizer``: the job's face analyzer, which the mosaic's closed loop (``identity_loop``) judges with."""
    engine = STYLIZERS.create(stylize.engine, **stylize.options)
    chain: Stylizer = MosaicRestorer(engine, stylize.mosaic, recognizer) if stylize.mosaic.enabled else engine
    return FaceDetailTransfer(chain, stylize.face_detail) if stylize.face_detail.strength > 0 else chain


def restorer_of(stylizer: Stylizer) -> MosaicRestorer | None:
    """The ``MosaicRestorer`` in a chain, if any."""
    while stylizer is not None and not isinstance(stylizer, MosaicRestorer):
        stylizer = getattr(stylizer, "stylizer", None)
    return stylizer


def variant_configs(base: StylizeConfig, extra: list[str]) -> dict[str, StylizeConfig]:
    """plain, default and the ``--variant NAME=JSON`` ones (dotted keys into the ``stylize`` section)."""
    as_dict = json.loads(json.dumps(dataclasses.asdict(base)))
    plain = json.loads(json.dumps(as_dict))
    plain["mosaic"]["enabled"] = False
    plain["face_detail"]["strength"] = 0.0
    if plain["engine"] == "neural":
        plain["options"] = {**plain["options"], "face_style_strength": None}
    out = {"plain": plain, "default": as_dict}
    for spec in extra:
        name, _, overrides = spec.partition("=")
        cfg = json.loads(json.dumps(as_dict))
        for key, value in json.loads(overrides).items():
            node = cfg
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        out[name] = cfg
    return {name: JobConfig.from_dict({"stylize": cfg}).stylize for name, cfg in out.items()}


def run_variants(
    cases: list[Case], stylizers: dict[str, Stylizer], style: np.ndarray, keypoints: str = "dlib"
) -> dict[str, dict]:
    """Every variant on every case, the variants one after the other on each case (so a machine that slows down
    for a while slows all of them alike): outputs, seconds per image, and the median over images of each image's
    seconds over plain's (the cost figure: robust to other load on the machine)."""
    outs: dict[str, list[np.ndarray]] = {n: [] for n in stylizers}
    seconds: dict[str, list[float]] = {n: [] for n in stylizers}
    choices: dict[str, list] = {n: [] for n in stylizers}  # per face (flattened): the closed loop's LoopChoice
    for case in cases:
        for name, stylizer in stylizers.items():
            t0 = time.perf_counter()
            outs[name].append(stylizer.stylize(case.image, style, case.faces(keypoints)))
            seconds[name].append(time.perf_counter() - t0)
            restorer = restorer_of(stylizer)
            picked = restorer.last_choices[0] if restorer is not None and restorer.last_choices else {}
            choices[name] += [picked.get(k) for k in range(len(case.boxes))]
    plain = np.array(seconds["plain"])
    return {n: {"outs": outs[n], "s": float(np.mean(seconds[n])), "choices": choices[n],
                "cost": float(np.median(np.array(seconds[n]) / plain))} for n in stylizers}  # fmt: skip


def face_scores(cases: list[Case], outs: list[np.ndarray], analyzers: dict) -> dict[str, np.ndarray]:
    """Per face (all cases flattened): each recognizer's distance (nan where it has no keypoints) and the two
    detail correlations (nan where null)."""
    res: dict[str, list] = {f"d_{n}": [] for n in analyzers}
    res["fine"], res["mid"] = [], []
    for case, out in zip(cases, outs):
        for name, analyzer in analyzers.items():
            kps = case.keypoints[name]
            have = [k for k in kps if k is not None]
            embs = iter(analyzer.embed(out, have)) if have else iter(())
            for k, ref in zip(kps, case.references[name]):
                res[f"d_{name}"].append(analyzer.distance(next(embs), ref) if k is not None else np.nan)
        for box in case.boxes:
            detail = photo_detail_correlation(out, case.image, box)
            res["fine"].append(np.nan if detail.fine is None else detail.fine)
            res["mid"].append(np.nan if detail.mid is None else detail.mid)
    return {k: np.array(v, dtype=float) for k, v in res.items()}


def buckets(cases: list[Case]) -> list[tuple[str, np.ndarray]]:
    sizes = np.array([s for c in cases for s in c.sizes])
    kinds = np.array([c.kind for c in cases for _ in c.sizes])
    out = [(f"{s}px", (kinds == "scene") & (sizes == s)) for s in SIZES]
    out += [("<48px", (kinds == "group") & (sizes < 48)), (">=48px", (kinds == "group") & (sizes >= 48))]
    return [(label, sel) for label, sel in out if sel.any()]


def evaluate(cases, configs, style, style_name, analyzers, judge, sheet_rows, loop_name="dlib") -> dict:
    floor = face_scores(cases, [c.image for c in cases], analyzers)
    chains = {name: build_chain(cfg, analyzers[loop_name]) for name, cfg in configs.items()}
    for case in cases:
        case.source_embeddings(loop_name, analyzers[loop_name])
    results = run_variants(cases, chains, style, loop_name)
    plain_outs = results["plain"]["outs"]
    for r in results.values():
        r["scores"] = face_scores(cases, r["outs"], analyzers)
        r["style"] = np.array([judge.distance(o, style) for o in r["outs"]])
        halos = [face_halo(o, p, c.boxes) for o, p, c in zip(r["outs"], plain_outs, cases)]
        r["halo"] = np.array([h for h in halos if h is not None])
    plain = results["plain"]
    report: dict = {}
    for name, r in results.items():
        rows = []
        for label, sel in buckets(cases):
            row = {"size": label, "n": int(sel.sum())}
            for rec_name, analyzer in analyzers.items():
                d = r["scores"][f"d_{rec_name}"][sel]
                dp, df = plain["scores"][f"d_{rec_name}"][sel], floor[f"d_{rec_name}"][sel]
                ok = ~np.isnan(d)
                lost = dp[ok].mean() - df[ok].mean() if ok.any() else np.nan
                row[f"rec_{rec_name}"] = (dp[ok].mean() - d[ok].mean()) / lost if ok.any() and lost > 1e-6 else np.nan
                row[f"match_{rec_name}"] = float((d[ok] < analyzer.match_threshold).mean()) if ok.any() else np.nan
                row[f"n_{rec_name}"] = int(ok.sum())
            row["fine"] = float(np.nanmean(r["scores"]["fine"][sel]))
            row["mid"] = float(np.nanmean(r["scores"]["mid"][sel]))
            picked = [c for c, s in zip(r["choices"], sel) if s and c is not None]
            if picked:  # the closed loop: mean strength and detail amount chosen, share that reached the target
                strengths = [c.strength for c in picked if c.strength is not None]
                row["loop_strength"] = float(np.mean(strengths)) if strengths else np.nan
                row["loop_detail"] = float(np.mean([c.detail for c in picked]))
                row["loop_target"] = float(np.mean([c.reason == "target" for c in picked]))
            rows.append(row)
        report[name] = {
            "rows": rows, "s_per_image": r["s"], "cost": r["cost"],
            "halo": float(r["halo"].mean()), "halo_max": float(r["halo"].max()),
            "style": float(r["style"].mean()), "style_change": float(r["style"].mean() / plain["style"].mean() - 1),
        }  # fmt: skip
    for case_index, case in enumerate(cases):  # contact sheet material: first scene of each size, and a group
        if case.kind == "scene" and case.name.endswith("_1.jpg") or case.name.startswith("2008_002079"):
            sheet_rows.append((style_name, case, {n: results[n]["outs"][case_index] for n in results}))
    return report


def print_report(style_name: str, report: dict, analyzers: dict) -> None:
    names = list(report)
    print(f"\n## {style_name}")
    for rec in analyzers:
        print(f"\n{style_name} | {rec}: recovered / match per face size (scenes: px; groups: <48px, >=48px)")
        print("| variant | " + " | ".join(r["size"] for r in report["plain"]["rows"]) + " |")
        print("|---|" + "---|" * len(report["plain"]["rows"]))
        for n in names:
            cells = [f"{_pct(r[f'rec_{rec}'])} / {r[f'match_{rec}']:.2f}" for r in report[n]["rows"]]
            print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\n{style_name}: photo-detail correlation fine / mid per face size (a copy of the photo is 1.00)")
    print("| variant | " + " | ".join(r["size"] for r in report["plain"]["rows"]) + " |")
    print("|---|" + "---|" * len(report["plain"]["rows"]))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{r['fine']:.2f} / {r['mid']:.2f}" for r in report[n]["rows"]) + " |")
    looped = [n for n in names if any("loop_strength" in r for r in report[n]["rows"])]
    if looped:
        print(f"\n{style_name}: closed loop per face size: mean face style strength / mean detail amount chosen, "
              "share of faces that reached the target")  # fmt: skip
        print("| variant | " + " | ".join(r["size"] for r in report["plain"]["rows"]) + " |")
        print("|---|" + "---|" * len(report["plain"]["rows"]))
        for n in looped:
            cells = [f"{r['loop_strength']:.2f} / {r['loop_detail']:.2f} / {r['loop_target']:.0%}"
                     if "loop_strength" in r else "-" for r in report[n]["rows"]]  # fmt: skip
            print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\n{style_name}: per image")
    print("| variant | s/image | x plain (median per image) | halo (0-255, mean / worst image) "
          "| learned style distance | vs plain |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n in names:
        r = report[n]
        print(f"| {n} | {r['s_per_image']:.2f} | {r['cost']:.2f} | {r['halo']:.2f} / {r['halo_max']:.2f} | "
              f"{r['style']:.3f} | {100 * r['style_change']:+.1f}% |")  # fmt: skip


def _pct(v: float) -> str:
    return "-" if v is None or np.isnan(v) else f"{100 * v:.0f}%"


def target_lines(style_name: str, name: str, report: dict, analyzers: dict) -> list[str]:
    """One line per target of the issue for variant ``name``: ``ok`` or ``MISS`` by how much."""
    r = report[name]
    lines = []

    def line(what: str, value: float, limit: float, higher: bool, fmt: str) -> None:
        good = value >= limit if higher else value <= limit
        by = "" if good else f" by {fmt.format(abs(value - limit))}"
        sign = ">=" if higher else "<="
        lines.append(f"target {style_name} {name}: {what} {fmt.format(value)} ({sign} {fmt.format(limit)}) "
                     f"{'ok' if good else 'MISS' + by}")  # fmt: skip

    for label, scene_sizes, group_bucket, rec_min, match_min in TARGETS:
        rows = [x for x in r["rows"] if x["size"] in {f"{s}px" for s in scene_sizes} | {group_bucket}]
        for rec in analyzers:
            recs = [x[f"rec_{rec}"] for x in rows if not np.isnan(x[f"rec_{rec}"])]
            matches = [x[f"match_{rec}"] for x in rows if not np.isnan(x[f"match_{rec}"])]
            if recs:
                line(f"{label} recovered ({rec}, worst size)", min(recs), rec_min, True, "{:.0%}")
            if matches:
                line(f"{label} match ({rec}, worst size)", min(matches), match_min, True, "{:.2f}")
        line(f"{label} fine detail corr. (worst size)", max(x["fine"] for x in rows), DETAIL_MAX, False, "{:.2f}")
        line(f"{label} mid detail corr. (worst size)", max(x["mid"] for x in rows), DETAIL_MAX, False, "{:.2f}")
    line("whole-image learned style distance vs plain", abs(r["style_change"]), STYLE_MAX, False, "{:.1%}")
    line("halo around the faces (face_halo, mean, 0-255)", r["halo"], HALO_MAX, False, "{:.2f}")
    line("cost (x plain's seconds per image)", r["cost"], COST_MAX, False, "{:.2f}")
    return lines


def contact_sheet(rows, path: str, names: list[str], tile: int = 128, every_face: bool = False) -> None:
    """Per painting and image: source | plain | each variant around its smallest face (``every_face``: around each
    face), the face's box grown to twice its size, zoomed to ``tile`` px."""
    blocks = []
    font = cv2.FONT_HERSHEY_SIMPLEX
    header = np.full((22, tile * (1 + len(names)) + 150, 3), 255, np.uint8)
    for k, label in enumerate(["source", *names]):
        cv2.putText(header, label, (150 + k * tile + 4, 16), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    blocks.append(header)
    todo = [(style_name, case, outs, k) for style_name, case, outs in rows
            for k in (range(len(case.sizes)) if every_face else [int(np.argmin(case.sizes))])]  # fmt: skip
    for style_name, case, outs, index in todo:
        x0, y0, x1, y1 = case.boxes[index]
        side = max(x1 - x0, y1 - y0) * 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        h, w = case.image.shape[:2]
        a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        c, d = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
        crops = [case.image[b:d, a:c]] + [outs[n][b:d, a:c] for n in names]
        tiles = [cv2.resize(np.ascontiguousarray(x), (tile, tile), interpolation=cv2.INTER_NEAREST) for x in crops]
        label = np.full((tile, 150, 3), 255, np.uint8)
        cv2.putText(label, style_name[:18], (4, 40), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(label, f"{case.sizes[index]} px {case.kind}", (4, 64), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        blocks.append(np.concatenate([label, *tiles], axis=1))
    Image.fromarray(np.concatenate(blocks, axis=0)).save(path)


def readme_figure(path: str, config: JobConfig) -> None:
    """Source, plain and default of the bundled group scene with the bundled style (committed material only)."""
    from stylid_core.sample_data import SCENES, build_scene, default_style_path

    stylize = config.stylize
    analyzer = create_face_analyzer(config.faces)  # the faces stylid run finds
    scene, _ = build_scene(SCENES["scene_group_small"])
    faces = analyzer.detect(scene)
    style = _rgb(default_style_path())
    outs = {name: build_chain(cfg).stylize(scene, style, faces) for name, cfg in variant_configs(stylize, []).items()}
    rows = [scene, *outs.values()]
    h, w = scene.shape[:2]
    scale = min(1.0, 900 / w)
    rows = [cv2.resize(r, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, quality=90)
    print(f"wrote {path}: source, plain, default ({len(faces)} faces detected)")
    case = Case("bundled group scene", scene, [f.box for f in faces], [round(f.size_px) for f in faces], "scene")
    sheet = os.path.splitext(path)[0] + "_faces.png"
    contact_sheet([("bundled style", case, outs)], sheet, list(outs), every_face=True)
    print(f"wrote {sheet}: every face zoomed, source | {' | '.join(outs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"))
    parser.add_argument("--styles", default="starry_night,the_scream,shipwreck")
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON of dotted stylize overrides")
    parser.add_argument("--no-groups", action="store_true")
    parser.add_argument("--per-size", type=int, default=0, help="at most this many scenes per face size (quick runs)")
    parser.add_argument("--readme-figure", help="write the bundled-sample before/after picture here and stop")
    parser.add_argument("--loop-recognizer", default=None,
                        help="the recognizer the closed loop judges with (dlib | mobilefacenet; default: the "
                             "config's faces.backend); the other one is the held-out judge")  # fmt: skip
    args = parser.parse_args()
    from jobs.config import load_job_config

    config: JobConfig = load_job_config(args.config)
    if args.readme_figure:
        readme_figure(args.readme_figure, config)
        return
    if not os.path.isdir(FACES_DIR) or not os.path.isdir(STYLES_DIR):
        print(f"bench_identity skipped: needs {FACES_DIR} and {STYLES_DIR} (STYLID_FACES_DIR, STYLID_STYLES_DIR)")
        return
    os.makedirs(RESULTS, exist_ok=True)
    analyzers = recognizers()
    cases = load_cases(analyzers, groups=not args.no_groups)
    if args.per_size:
        seen: dict[str, int] = {}
        kept = []
        for c in cases:
            group = c.name.rsplit("_", 1)[0] if c.kind == "scene" else c.name
            seen[group] = seen.get(group, 0) + 1
            if c.kind == "group" or seen[group] <= args.per_size:
                kept.append(c)
        cases = kept
    configs = variant_configs(config.stylize, args.variant)
    engine = build_chain(configs["plain"])
    print(f"{sum(c.kind == 'scene' for c in cases)} scenes, {sum(c.kind == 'group' for c in cases)} group photos, "
          f"{sum(len(c.sizes) for c in cases)} faces; engine {engine.name} ({engine.model}); recognizers "
          f"{', '.join(f'{n} ({a.name}, match < {a.match_threshold})' for n, a in analyzers.items())}")  # fmt: skip
    for name, cfg in configs.items():
        print(f"variant {name}: options {cfg.options}, mosaic {cfg.mosaic.enabled and cfg.mosaic}, "
              f"face_detail strength {cfg.face_detail.strength}")  # fmt: skip
    loop_name = args.loop_recognizer or ("dlib" if config.faces.backend == "dlib" else "mobilefacenet")
    if any(cfg.mosaic.enabled and cfg.mosaic.identity_loop.enabled for cfg in configs.values()):
        print(f"closed loop judged by {loop_name}; held out: {', '.join(n for n in analyzers if n != loop_name)}")
    judge = StyleJudge()
    full: dict = {}
    sheet_rows: list = []
    lines: list[str] = []
    for style_name in args.styles.split(","):
        style = _rgb(os.path.join(STYLES_DIR, f"{style_name}.jpg"))
        report = evaluate(cases, configs, style, style_name, analyzers, judge, sheet_rows, loop_name)
        print_report(style_name, report, analyzers)
        for name in [n for n in configs if n != "plain"]:
            lines += target_lines(style_name, name, report, analyzers)
        full[style_name] = report
    print()
    print("\n".join(lines))
    sheet = os.path.join(RESULTS, "contact_sheet.png")
    contact_sheet(sheet_rows, sheet, list(configs))
    print(f"\ncontact sheet (source | {' | '.join(configs)}): {sheet}")
    print(f"targets: {sum(x.endswith('ok') for x in lines)} ok, {sum('MISS' in x for x in lines)} MISS")
    with open(os.path.join(RESULTS, "bench_identity.json"), "w") as f:
        json.dump({"report": full, "targets": lines}, f, indent=1, default=float)


if __name__ == "__main__":
    main()

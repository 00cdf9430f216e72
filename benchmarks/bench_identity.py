"""Identity kept per face size: each engine plain, with the mosaic, and with mosaic plus identity-aware stylization.

Data: the 14 people of ``../shared/faces`` (``$STYLID_FACES_DIR``): its 27 scenes (faces pasted at 24-96 px, truth
boxes in ``scenes/truth.json``) and its five VOC group photos with hand-annotated boxes, stylized after the
paintings of ``../shared/styles`` (``$STYLID_STYLES_DIR``). Neither folder is part of the project; nothing the
benchmark writes from them may be committed (outputs go to ``benchmarks/results/``, which git ignores).

Identity is dlib's euclidean distance (match under 0.6). On the scenes, each face is compared with the person's
full-resolution photo (``people/<person>__1.jpg``, the photo the scene was made from); its keypoints are the
photo's five dlib keypoints mapped into the scene through the truth box. On the group photos (no reference photo),
each face is compared with itself unstylized, keypoints from dlib's 5-point model on the annotated box.

Per face size it prints: ``d_floor`` (the unstylized scene: what shrinking alone costs), ``d_plain``, ``d_mosaic``
and ``d_id`` (mosaic plus identity-aware stylization: the engine's own mode and the face detail transfer), the
share of the loss recovered ``(d_plain - d_x) / (d_plain - d_floor)``, match rates, the whole image's style
distance to the style image and the *face regions'* style distance to it (Lab-statistics distance of the face
boxes: a restored face that is only the photo pasted back shows up there), and the time per image of each variant.

    python benchmarks/bench_identity.py                            # neural engine, Starry Night and The Scream
    python benchmarks/bench_identity.py --engines classical,neural,diffusion --styles starry_night,the_scream,shipwreck
    python benchmarks/bench_identity.py --curve                    # identity vs face style, face_style_strength
    python benchmarks/bench_identity.py --detail 0.1,0.2,0.3          # face detail transfer: sigma sweep
    python benchmarks/bench_identity.py --layouts                  # mosaic canvas vs sheet layout
    python benchmarks/bench_identity.py --targets 96,128,192 --max-face-px 128    # target_face_px sweep
    python benchmarks/bench_identity.py --readme-figure docs/group_scene_neural.jpg   # from the bundled sample

The diffusion engine runs the tiny random model on CPU (``--diffusion-options``); its output is noise-like, so its
rows only show that the code paths run. Its identity-aware variant is its own content consistency guidance.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from stylid_core.config import FaceDetailConfig, FacesConfig, MosaicConfig
from stylid_core.faces import Face, create_face_analyzer
from stylid_core.metrics import style_distance
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.face_detail import FaceDetailTransfer
from stylid_core.stylize.mosaic import MosaicRestorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES_DIR = os.environ.get("STYLID_FACES_DIR", os.path.join(ROOT, "..", "shared", "faces"))
STYLES_DIR = os.environ.get("STYLID_STYLES_DIR", os.path.join(ROOT, "..", "shared", "styles"))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SIZES = (24, 32, 48, 64, 96)
DEFAULT_DIFFUSION = {"tiny": True, "device": "cpu", "resolution": 128, "steps": 4}


def _rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@dataclass
class Case:
    """One benchmark image: its faces (box + keypoints), each face's reference embedding and size."""

    name: str
    image: np.ndarray
    faces: list[Face]
    references: list[np.ndarray]
    sizes: list[int]
    kind: str  # scene | group
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    floor_embeddings: np.ndarray | None = None


def load_cases(analyzer, faces_dir: str = FACES_DIR, groups: bool = True) -> list[Case]:
    """The scenes (reference: the person's photo) and the VOC group photos (reference: the face unstylized)."""
    import dlib

    from stylid_core.faces.dlib_backend import default_model_dir

    truth = json.load(open(os.path.join(faces_dir, "scenes", "truth.json")))
    photos: dict[str, Face] = {}
    cases = []
    for scene, entries in sorted(truth.items()):
        image = _rgb(os.path.join(faces_dir, "scenes", scene))
        faces, refs, sizes = [], [], []
        for e in entries:
            if e["source"] not in photos:
                found = analyzer.analyze(_rgb(os.path.join(faces_dir, e["source"])), max_faces=1)
                photos[e["source"]] = found[0]
            photo = photos[e["source"]]
            sx0, sy0, sx1, sy1 = e["source_box"]
            side = ((sx1 - sx0) + (sy1 - sy0)) / 2
            ox, oy = (sx0 + sx1) / 2 - side / 2, (sy0 + sy1) / 2 - side / 2
            s = e["size"] / side
            kps = (np.asarray(photo.keypoints, dtype=np.float32) - [ox, oy]) * s + e["box"][:2]
            faces.append(Face(box=tuple(float(v) for v in e["box"]), keypoints=kps.astype(np.float32), score=1.0))
            refs.append(photo.embedding)
            sizes.append(int(e["size"]))
        cases.append(Case(scene, image, faces, refs, sizes, "scene"))
    if groups:
        shape = dlib.shape_predictor(os.path.join(default_model_dir(), "shape_predictor_5_face_landmarks.dat"))
        info = json.load(open(os.path.join(faces_dir, "groups", "faces.json")))
        for name, meta in sorted(info.items()):
            if not meta.get("annotated_boxes"):
                continue
            image = _rgb(os.path.join(faces_dir, "groups", name))
            faces = []
            for x0, y0, x1, y1 in meta["annotated_boxes"]:
                parts = shape(image, dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1)).parts()
                kps = np.array([[p.x, p.y] for p in parts], dtype=np.float32)
                faces.append(Face(box=(float(x0), float(y0), float(x1), float(y1)), keypoints=kps, score=1.0))
            refs = list(analyzer.embed(image, [f.keypoints for f in faces]))
            sizes = [round(f.size_px) for f in faces]
            cases.append(Case(name, image, faces, refs, sizes, "group"))
    return cases


def face_region_style(image: np.ndarray, faces: list[Face], style: np.ndarray) -> list[float]:
    """The style distance of each face box of ``image`` to the style image."""
    out = []
    for f in faces:
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        crop = image[max(0, y0) : y1, max(0, x0) : x1]
        out.append(style_distance(crop, style) if crop.size else float("nan"))
    return out


def variants(
    engine: str, options: dict, mosaic: MosaicConfig, face_strength: float | None, detail: FaceDetailConfig
) -> dict:
    """name -> a Stylizer: plain (no mosaic, no identity-aware), mosaic, and mosaic + identity-aware: the engine's
    own identity-aware mode (neural: ``face_style_strength``; diffusion: content consistency guidance) and the
    face detail transfer (``stylid_core.stylize.face_detail``, what ``stylid run`` does by default)."""
    if engine == "diffusion":
        off = {**options, "guidance": False, "reweight": False, "anchor": False}
        plain = STYLIZERS.create("diffusion", **off)
        guided = STYLIZERS.create("diffusion", **{**options, "guidance": True, "reweight": True, "anchor": True})
        out = {"plain": plain, "mosaic": MosaicRestorer(plain, mosaic)}
        out["id"] = FaceDetailTransfer(MosaicRestorer(guided, mosaic), detail)
        return out
    base = STYLIZERS.create(engine, **({**options, "face_style_strength": None} if engine == "neural" else options))
    out = {"plain": base, "mosaic": MosaicRestorer(base, mosaic)}
    aware = base
    if engine == "neural" and face_strength is not None:
        aware = STYLIZERS.create(engine, **{**options, "face_style_strength": face_strength})
    out["id"] = FaceDetailTransfer(MosaicRestorer(aware, mosaic), detail)
    return out


def evaluate(cases: list[Case], stylizers: dict, style: np.ndarray, analyzer) -> dict:
    """Per variant: per-face distances, face-region style, whole-image style and seconds per image."""
    result: dict[str, dict] = {}
    for name, stylizer in [("floor", None), *stylizers.items()]:
        d, face_style, whole, seconds, sizes, kinds = [], [], [], 0.0, [], []
        for case in cases:
            if stylizer is None:
                out = case.image
            else:
                t0 = time.perf_counter()
                out = stylizer.stylize(case.image, style, case.faces)
                seconds += time.perf_counter() - t0
            case.outputs[name] = out
            if name == "floor" and case.floor_embeddings is not None:
                embs = case.floor_embeddings
            else:
                embs = analyzer.embed(out, [f.keypoints for f in case.faces])
                if name == "floor":
                    case.floor_embeddings = embs
            d += [analyzer.distance(e, r) for e, r in zip(embs, case.references)]
            face_style += face_region_style(out, case.faces, style)
            whole += [style_distance(out, style)] * len(case.faces)
            sizes += case.sizes
            kinds += [case.kind] * len(case.faces)
        result[name] = {
            "d": np.array(d), "face_style": np.array(face_style), "whole_style": np.array(whole),
            "sizes": np.array(sizes), "kinds": np.array(kinds), "s_per_image": seconds / max(1, len(cases)),
        }  # fmt: skip
    return result


def _bucket_rows(res: dict, kind: str, buckets) -> list[dict]:
    rows = []
    names = [n for n in ("plain", "mosaic", "id") if n in res]
    for label, lo, hi in buckets:
        sel = (res["floor"]["kinds"] == kind) & (res["floor"]["sizes"] >= lo) & (res["floor"]["sizes"] < hi)
        if not sel.any():
            continue
        row = {"size": label, "n": int(sel.sum()), "d_floor": float(res["floor"]["d"][sel].mean())}
        row["match_floor"] = float((res["floor"]["d"][sel] < 0.6).mean())
        for n in names:
            row[f"d_{n}"] = float(res[n]["d"][sel].mean())
            row[f"match_{n}"] = float((res[n]["d"][sel] < 0.6).mean())
            row[f"whole_{n}"] = float(res[n]["whole_style"][sel].mean())
            row[f"face_{n}"] = float(np.nanmean(res[n]["face_style"][sel]))
        lost = row["d_plain"] - row["d_floor"]
        for n in names[1:]:
            row[f"rec_{n}"] = (row["d_plain"] - row[f"d_{n}"]) / lost if lost > 1e-6 else float("nan")
        rows.append(row)
    return rows


SCENE_BUCKETS = [(f"{s}px", s, s + 1) for s in SIZES]
GROUP_BUCKETS = [("<48px", 0, 48), (">=48px", 48, 10_000)]


def print_tables(title: str, res: dict) -> dict:
    names = [n for n in ("plain", "mosaic", "id") if n in res]
    out = {}
    for kind, buckets in (("scene", SCENE_BUCKETS), ("group", GROUP_BUCKETS)):
        rows = _bucket_rows(res, kind, buckets)
        if not rows:
            continue
        out[kind] = rows
        ref = "the person's photo" if kind == "scene" else "the face unstylized"
        print(f"\n{title} | {kind}s (distance to {ref}; match < 0.6)")
        head = ["size", "n", "d_floor"] + [f"d_{n}" for n in names] + [f"rec_{n}" for n in names[1:]]
        head += ["m_floor"] + [f"m_{n}" for n in names]
        head += [f"whole_{n}" for n in names] + [f"face_{n}" for n in names]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            cells = [r["size"], str(r["n"]), f"{r['d_floor']:.3f}"] + [f"{r[f'd_{n}']:.3f}" for n in names]
            cells += [f"{100 * r[f'rec_{n}']:.0f}%" for n in names[1:]]
            cells += [f"{r['match_floor']:.2f}"] + [f"{r[f'match_{n}']:.2f}" for n in names]
            cells += [f"{r[f'whole_{n}']:.2f}" for n in names] + [f"{r[f'face_{n}']:.2f}" for n in names]
            print("| " + " | ".join(cells) + " |")
    times = ", ".join(f"{n} {res[n]['s_per_image']:.2f}" for n in names)
    print(f"seconds per image: {times}")
    out["s_per_image"] = {n: res[n]["s_per_image"] for n in names}
    return out


def check_targets(title: str, res: dict) -> None:
    """The issue's targets (neural engine, Starry Night and The Scream), for the best mosaic variant."""
    rows = _bucket_rows(res, "scene", SCENE_BUCKETS)
    whole_plain = res["plain"]["whole_style"].mean()
    face_plain = np.nanmean(res["plain"]["face_style"])
    for n in [n for n in ("mosaic", "id") if n in res]:
        small = [r for r in rows if r["size"] in ("24px", "32px", "48px")]
        large = [r for r in rows if r["size"] in ("64px", "96px")]
        rec_s = min(r[f"rec_{n}"] for r in small)
        match_s = min(r[f"match_{n}"] for r in small)
        rec_l = min(r[f"rec_{n}"] for r in large) if large else float("nan")
        whole = res[n]["whole_style"].mean() / whole_plain - 1
        face = np.nanmean(res[n]["face_style"]) / face_plain - 1
        print(
            f"targets {title} {n}: 24-48 px recovered min {100 * rec_s:.0f}% (>=80%) "
            f"{'ok' if rec_s >= 0.8 else 'MISS'}, match min {match_s:.2f} (>=0.9) "
            f"{'ok' if match_s >= 0.9 else 'MISS'}; "
            f"64-96 px recovered min "
            f"{100 * rec_l:.0f}% (>=70%) {'ok' if rec_l >= 0.7 else 'MISS'}; whole-image style {100 * whole:+.1f}% "
            f"(within 5%) {'ok' if abs(whole) <= 0.05 else 'MISS'}; face-region style {100 * face:+.1f}% (<= +25%) "
            f"{'ok' if face <= 0.25 else 'MISS'}"
        )


def strength_curve(
    cases, base, style, style_name, analyzer, neural_options, mosaic, strengths, detail: FaceDetailConfig | None = None
) -> dict:
    """Identity against face-region style for the mosaic + identity-aware neural engine, per face strength: with
    ``detail`` None the face style strength alone, else with that face detail transfer after it."""
    curve = {}
    small = (base["floor"]["kinds"] == "scene") & (base["floor"]["sizes"] <= 48)
    large = (base["floor"]["kinds"] == "scene") & (base["floor"]["sizes"] > 48)
    d_floor, d_plain = base["floor"]["d"], base["plain"]["d"]
    for fs in strengths:
        cfg = detail if detail is not None else FaceDetailConfig(strength=0.0)
        res = evaluate(cases, {"id": variants("neural", neural_options, mosaic, fs, cfg)["id"]}, style, analyzer)
        d = res["id"]["d"]
        row = {
            "d_small": float(d[small].mean()),
            "rec_small": float((d_plain[small].mean() - d[small].mean()) / (d_plain[small] - d_floor[small]).mean()),
            "match_small": float((d[small] < 0.6).mean()),
            "rec_large": float((d_plain[large].mean() - d[large].mean()) / (d_plain[large] - d_floor[large]).mean()),
            "face_style": float(np.nanmean(res["id"]["face_style"])),
            "face_style_plain": float(np.nanmean(base["plain"]["face_style"])),
            "whole_change": float(res["id"]["whole_style"].mean() / base["plain"]["whole_style"].mean() - 1),
            "s_per_image": res["id"]["s_per_image"],
        }
        scenes = base["floor"]["kinds"] == "scene"
        for s in SIZES:
            m = scenes & (base["floor"]["sizes"] == s)
            if m.any():
                row[f"rec_{s}"] = float((d_plain[m].mean() - d[m].mean()) / (d_plain[m] - d_floor[m]).mean())
                row[f"match_{s}"] = float((d[m] < 0.6).mean())
                plain_face = float(np.nanmean(base["plain"]["face_style"][m]))
                row[f"face_style_{s}"] = float(np.nanmean(res["id"]["face_style"][m])) / plain_face - 1
        curve[fs] = row
        per_size = " ".join(
            f"{s}:{100 * row[f'rec_{s}']:.1f}%/{row[f'match_{s}']:.2f}/{100 * row[f'face_style_{s}']:+.0f}%"
            for s in SIZES
            if f"rec_{s}" in row
        )
        print(f"curve {style_name} face_style_strength {fs:.2f} per size (recovered/match/face style): {per_size}")
        print(
            f"curve {style_name} face_style_strength {fs:.1f}: faces <=48 px d {row['d_small']:.3f} recovered "
            f"{100 * row['rec_small']:.0f}% match {row['match_small']:.2f}; 64-96 px recovered "
            f"{100 * row['rec_large']:.0f}%; face-region style {row['face_style']:.2f} (plain "
            f"{row['face_style_plain']:.2f}, {100 * (row['face_style'] / row['face_style_plain'] - 1):+.0f}%); "
            f"whole image {100 * row['whole_change']:+.1f}%; {row['s_per_image']:.2f} s/image",
            flush=True,
        )
    return curve


def save_group_picture(case: Case, path: str, names=("floor", "plain", "mosaic", "id")) -> None:
    rows = [case.outputs[n] for n in names if n in case.outputs]
    h, w = rows[0].shape[:2]
    scale = min(1.0, 900 / w)
    rows = [cv2.resize(r, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, quality=88)


def readme_figure(
    path: str, options: dict, mosaic: MosaicConfig, face_strength: float | None, detail: FaceDetailConfig
) -> None:
    """Before/after of the bundled group scene with the bundled style (committed material only)."""
    from stylid_core.sample_data import SCENES, build_scene, default_style_path

    analyzer = create_face_analyzer(FacesConfig(backend="dlib"))
    scene, _ = build_scene(SCENES["scene_group_small"])
    faces = analyzer.detect(scene)
    style = _rgb(default_style_path())
    case = Case("scene_group_small", scene, faces, [], [], "scene")
    for name, stylizer in variants("neural", options, mosaic, face_strength, detail).items():
        case.outputs[name] = stylizer.stylize(scene, style, faces)
    case.outputs["floor"] = scene
    save_group_picture(case, path)
    print(f"wrote {path}: source, plain, mosaic, mosaic + identity-aware ({len(faces)} faces detected)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="neural")
    parser.add_argument("--styles", default="starry_night,the_scream")
    parser.add_argument("--neural-options", default='{"threads": 2}')
    parser.add_argument("--classical-options", default="{}")
    parser.add_argument("--diffusion-options", default=json.dumps(DEFAULT_DIFFUSION))
    parser.add_argument("--max-face-px", type=float, default=MosaicConfig().max_face_px)
    parser.add_argument("--target-face-px", type=int, default=MosaicConfig().target_face_px)
    parser.add_argument("--layout", default=MosaicConfig().layout)
    parser.add_argument("--face-strength", type=float, default=None, help="neural face_style_strength (id variant)")
    parser.add_argument("--curve", action="store_true", help="neural: identity vs face style over face strengths")
    parser.add_argument("--strengths", default="1.0,0.5,0.25,0.0", help="face strengths of --curve")
    parser.add_argument("--curve-detail", action="store_true", help="--curve with the face detail transfer on")
    parser.add_argument("--layouts", action="store_true", help="neural: canvas vs sheet layout")
    parser.add_argument("--targets", default="", help="neural: sweep target_face_px (comma list)")
    parser.add_argument("--detail-strength", type=float, default=FaceDetailConfig().strength)
    parser.add_argument("--detail-sigma", type=float, default=FaceDetailConfig().sigma)
    parser.add_argument("--detail", default="", help="neural: sweep the face detail transfer's sigma (comma list)")
    parser.add_argument("--no-groups", action="store_true")
    parser.add_argument("--per-size", type=int, default=0, help="at most this many scenes per face size (quick runs)")
    parser.add_argument("--readme-figure", help="write the bundled-sample before/after picture here and stop")
    args = parser.parse_args()
    from stylid_core.stylize.neural import NeuralOptions

    face_strength = args.face_strength
    if face_strength is None:
        face_strength = NeuralOptions().face_style_strength
    mosaic = MosaicConfig(max_face_px=args.max_face_px, target_face_px=args.target_face_px, layout=args.layout)
    detail = FaceDetailConfig(strength=args.detail_strength, sigma=args.detail_sigma)
    neural_options = json.loads(args.neural_options)
    if args.readme_figure:
        readme_figure(args.readme_figure, neural_options, mosaic, face_strength, detail)
        return
    if not os.path.isdir(FACES_DIR) or not os.path.isdir(STYLES_DIR):
        print(f"bench_identity skipped: needs {FACES_DIR} and {STYLES_DIR} (STYLID_FACES_DIR, STYLID_STYLES_DIR)")
        return
    os.makedirs(RESULTS, exist_ok=True)
    analyzer = create_face_analyzer(FacesConfig(backend="dlib", upsample=1))
    cases = load_cases(analyzer, groups=not args.no_groups)
    if args.per_size:
        seen: dict[str, int] = {}
        kept = []
        for c in cases:
            group = c.name.rsplit("_", 1)[0] if c.kind == "scene" else c.name
            seen[group] = seen.get(group, 0) + 1
            if c.kind == "group" or seen[group] <= args.per_size:
                kept.append(c)
        cases = kept
    print(f"{sum(c.kind == 'scene' for c in cases)} scenes, {sum(c.kind == 'group' for c in cases)} group photos, "
          f"{sum(len(c.faces) for c in cases)} faces; mosaic {mosaic}")  # fmt: skip
    report: dict = {}
    options = {
        "neural": neural_options,
        "classical": json.loads(args.classical_options),
        "diffusion": json.loads(args.diffusion_options),
    }
    for style_name in args.styles.split(","):
        style = _rgb(os.path.join(STYLES_DIR, f"{style_name}.jpg"))
        if args.curve:
            # plain as in the tables: the engine alone, no weaker style inside the faces
            plain = STYLIZERS.create("neural", **{**neural_options, "face_style_strength": None})
            base = evaluate(cases, {"plain": plain}, style, analyzer)
            strengths = [float(v) for v in args.strengths.split(",")]
            curve_detail = detail if args.curve_detail else None
            curve = strength_curve(
                cases, base, style, style_name, analyzer, neural_options, mosaic, strengths, curve_detail
            )
            report[f"curve/{style_name}"] = curve
            continue
        if args.detail:
            for sigma in (float(v) for v in args.detail.split(",")):
                cfg = FaceDetailConfig(strength=args.detail_strength, sigma=sigma)
                res = evaluate(cases, variants("neural", neural_options, mosaic, face_strength, cfg), style, analyzer)
                title = f"neural / {style_name} / face detail sigma {sigma}"
                report[title] = print_tables(title, res)
                check_targets(title, res)
            continue
        if args.layouts or args.targets:
            configs = {}
            if args.layouts:
                configs = {lay: MosaicConfig(**{**mosaic.__dict__, "layout": lay}) for lay in ("canvas", "sheet")}
            for t in filter(None, args.targets.split(",")):
                configs[f"target {t}"] = MosaicConfig(**{**mosaic.__dict__, "target_face_px": int(t)})
            for label, cfg in configs.items():
                res = evaluate(cases, variants("neural", neural_options, cfg, face_strength, detail), style, analyzer)
                title = f"neural / {style_name} / {label}"
                report[title] = print_tables(title, res)
                check_targets(title, res)
            continue
        for engine in args.engines.split(","):
            stylizers = variants(engine, options[engine], mosaic, face_strength, detail)
            title = f"{engine} / {style_name}"
            res = evaluate(cases, stylizers, style, analyzer)
            report[title] = print_tables(title, res)
            report[title]["model"] = stylizers["plain"].model
            if engine == "neural":
                check_targets(title, res)
            for case in cases:
                if case.kind == "group" and case.name.startswith("2008_002079"):
                    path = os.path.join(RESULTS, f"group_{engine}_{style_name}.jpg")
                    save_group_picture(case, path)
                    print(f"group picture (source, plain, mosaic, mosaic + identity-aware): {path}")
    with open(os.path.join(RESULTS, "bench_identity.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
    main()

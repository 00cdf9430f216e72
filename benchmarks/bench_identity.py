"""Identity kept per face size, with and without the mosaic restored content image.

Real faces (the bundled portraits) are placed at 24, 32, 48, 64 and 96 px into scenes, which are stylized with and
without the mosaic. For each size it prints the mean identity distance from each face to the full-resolution
photo of the same person: unstylized (the floor: what shrinking alone costs), stylized without mosaic, stylized
with mosaic; the match rate (distance under the backend's threshold) of each; the share of the identity lost to
stylization that the mosaic recovers, (d_plain - d_mosaic) / (d_plain - d_floor); and the whole image's style
distance to the style image with and without mosaic.

    python benchmarks/bench_identity.py                    # classical engine (the embedded default)
    python benchmarks/bench_identity.py --engine diffusion --options '{"tiny": true, "resolution": 128, "steps": 10}'
    python benchmarks/bench_identity.py --model /models/sd15    # the paper's comparison with real SD weights:
        baseline StyleID (no mosaic, no consistency guidance) vs + mosaic vs + mosaic + consistency guidance

With the tiny random model the diffusion figures only exercise the code (its output is noise-like); the real
comparison needs real weights (``--model``) and, at 512 px and 50 steps, a GPU. ``--model sd15-shaped`` runs the
same three variants on SD 1.5's architecture with random weights (true GPU cost per size, noise-like images).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from stylid_core.config import FacesConfig, MosaicConfig
from stylid_core.faces import Face, create_face_analyzer
from stylid_core.metrics import style_distance
from stylid_core.sample_data import build_scene, default_style_path, load_photo
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.mosaic import MosaicRestorer

PEOPLE = ("biden", "obama2", "grace_hopper", "astronaut", "obama")
SIZES = (24, 32, 48, 64, 96)


def run(
    engine: str, options: dict, sizes=SIZES, mosaic: MosaicConfig | None = None, verbose: bool = True, label: str = ""
) -> dict:
    analyzer = create_face_analyzer(FacesConfig(backend="dlib"))
    style = load_photo(default_style_path().rsplit("/", 1)[-1].rsplit(".", 1)[0])
    references, photo_kps = {}, {}
    for stem in PEOPLE:
        photo = load_photo(stem)
        face = analyzer.analyze(photo, max_faces=1)[0]
        references[stem], photo_kps[stem] = face.embedding, face.keypoints
    stylizer = STYLIZERS.create(engine, **options)
    mosaic_cfg = mosaic or MosaicConfig(max_face_px=max(sizes) + 1)
    restorer = MosaicRestorer(stylizer, mosaic_cfg)
    rows = []
    for size in sizes:
        scene, placed = build_scene([(stem, size) for stem in PEOPLE])
        faces = [Face(box=p.box, keypoints=p.to_scene(photo_kps[p.stem]), score=1.0) for p in placed]
        t0 = time.perf_counter()
        plain = stylizer.stylize(scene, style, faces)
        t1 = time.perf_counter()
        mosaic_out = restorer.stylize(scene, style, faces) if size < mosaic_cfg.max_face_px else plain
        t2 = time.perf_counter()
        kps = [f.keypoints for f in faces]
        dists = {}
        for which, img in (("floor", scene), ("plain", plain), ("mosaic", mosaic_out)):
            embs = analyzer.embed(img, kps)
            dists[which] = np.array([analyzer.distance(e, references[p.stem]) for e, p in zip(embs, placed)])
        sd_plain, sd_mosaic = style_distance(plain, style), style_distance(mosaic_out, style)
        lost = dists["plain"].mean() - dists["floor"].mean()
        recovered = (dists["plain"].mean() - dists["mosaic"].mean()) / lost if lost > 1e-6 else float("nan")
        rows.append(
            {
                "size_px": size,
                "d_floor": dists["floor"].mean(),
                "d_plain": dists["plain"].mean(),
                "d_mosaic": dists["mosaic"].mean(),
                "match_floor": (dists["floor"] < analyzer.match_threshold).mean(),
                "match_plain": (dists["plain"] < analyzer.match_threshold).mean(),
                "match_mosaic": (dists["mosaic"] < analyzer.match_threshold).mean(),
                "recovered": recovered,
                "style_plain": sd_plain,
                "style_mosaic": sd_mosaic,
                "style_change": (sd_mosaic - sd_plain) / max(sd_plain, 1e-9),
                "s_plain": t1 - t0,
                "s_mosaic": t2 - t1,
            }
        )
    if verbose:
        print_table(rows, f"{label}{stylizer.name} ({stylizer.model})", analyzer)
    return {"engine": stylizer.name, "model": stylizer.model, "rows": rows}


def print_table(rows: list[dict], engine: str, analyzer) -> None:
    print(
        f"engine: {engine}; identity: {analyzer.name} euclidean distance to the full-resolution photo "
        f"(match < {analyzer.match_threshold}); {len(PEOPLE)} people per size"
    )
    header = (
        "size",
        "d_floor",
        "d_plain",
        "d_mosaic",
        "recovered",
        "match_floor",
        "match_plain",
        "match_mosaic",
        "style_plain",
        "style_mosaic",
        "style_chg",
        "s_plain",
        "s_mosaic",
    )
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            f"{r['size_px']}px", f"{r['d_floor']:.3f}", f"{r['d_plain']:.3f}", f"{r['d_mosaic']:.3f}",
            f"{100 * r['recovered']:.0f}%", f"{r['match_floor']:.2f}", f"{r['match_plain']:.2f}",
            f"{r['match_mosaic']:.2f}", f"{r['style_plain']:.2f}", f"{r['style_mosaic']:.2f}",
            f"{100 * r['style_change']:+.1f}%", f"{r['s_plain']:.2f}", f"{r['s_mosaic']:.2f}",
        ]))  # fmt: skip
    small = [r for r in rows if r["size_px"] < 48]
    if small:
        rec = np.mean([r["recovered"] for r in small])
        match_up = all(r["match_mosaic"] >= r["match_plain"] for r in small)
        style_ok = all(abs(r["style_change"]) <= 0.05 for r in small)
        print(
            f"faces under 48 px: mean identity loss recovered by mosaic {100 * rec:.0f}% (target >= 50%); "
            f"match rate not lowered: {match_up}; style distance within 5%: {style_ok}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="classical")
    parser.add_argument("--options", default="{}", help="engine options as JSON")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--model", help="Stable Diffusion folder or hub id: run the paper's three diffusion variants")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if not args.model:
        run(args.engine, json.loads(args.options), sizes=sizes)
        return
    base = {"model": args.model, **json.loads(args.options)}
    # "plain" columns are the engine without mosaic; the guidance switch changes the engine itself
    print("== baseline StyleID (plain columns) vs + mosaic (mosaic columns), consistency guidance off ==")
    run("diffusion", {**base, "guidance": False, "reweight": False, "anchor": False}, sizes=sizes)
    print("== + consistency guidance (plain: guidance only; mosaic: mosaic + guidance) ==")
    run("diffusion", {**base, "guidance": True, "reweight": True, "anchor": True}, sizes=sizes)


if __name__ == "__main__":
    main()

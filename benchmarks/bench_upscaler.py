"""Face upscalers for the mosaic: identity gained by Real-ESRGAN x4plus (ncnn, from PyPI) over Lanczos, and cost.

Every photo of ``../shared/faces/people`` (39 photos of 14 people; override with ``STYLID_TEST_FACES``) is shrunk
so its face is S px wide (S = 24, 32, 48, 64), and the mosaic of ``MosaicRestorer`` is built around that face with
each upscaler (target 128 px, margin 0.5, the defaults). dlib's distance to the face in the full-resolution photo
is measured, at the keypoints dlib found there (scaled), so detection plays no part:

- ``small``: the shrunk face itself (the floor of what shrinking costs);
- ``tile``: the upscaled face tile, what the engine is given;
- ``tile+cl``: that tile after the classical stylizer (the mosaic's canvas, stylized);
- ``final``: the stylized tile restored into the small image (the pipeline's output at the face), next to
  ``plain``, the small image stylized without the mosaic.

Match rate = distance under dlib's 0.6. ``ms/face`` is the median time of the upscaler call alone on one face
crop (ncnn on one thread, its default).

``--engine neural`` (with a painting as ``--style``) runs what ``stylid run`` runs instead: the neural engine, its
default ``face_style_strength`` inside the mosaic, and the face detail transfer (``FaceDetailTransfer``), once per
upscaler; only ``plain`` and ``final`` are measured then (the sheet layout has no single canvas to score).

    flock /tmp/stylid-bench.lock python benchmarks/bench_upscaler.py [--style PATH] [--per-person N] [--limit N]
    python benchmarks/bench_upscaler.py --engine neural --style ../shared/styles/starry_night.jpg --per-person 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from stylid_core.config import FaceDetailConfig, FacesConfig, MosaicConfig
from stylid_core.faces import Face, create_face_analyzer
from stylid_core.sample_data import default_style_path
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.classical import ClassicalStylizer
from stylid_core.stylize.face_detail import FaceDetailTransfer
from stylid_core.stylize.mosaic import MosaicRestorer

FACES_DIR = Path(os.environ.get("STYLID_TEST_FACES", Path(__file__).resolve().parents[1].parent / "shared" / "faces"))
SIZES = (24, 32, 48, 64)
UPSCALERS = ("lanczos", "realesrgan")


def _rgb(path: Path | str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def summarize(rows: list[dict], threshold: float) -> dict:
    """Print the per-size table and the realesrgan-minus-lanczos gains; return the figures."""
    sizes = sorted({r["size"] for r in rows})
    photos = len({r["photo"] for r in rows})
    print(f"\n{photos} photos; dlib distance to the full-resolution face (match rate at 0.6)")
    stages = [k for k in ("tile", "tile+cl", "final") if f"lanczos_{k}" in rows[0]]
    keys = ["small", "plain"] + [f"{u}_{k}" for k in stages for u in UPSCALERS]
    print("| face px | " + " | ".join(keys) + " | lanczos ms/face | realesrgan ms/face |")
    print("|" + " --- |" * (len(keys) + 3))
    summary = {}
    for size in sizes:
        sel = [r for r in rows if r["size"] == size]
        cells, fig = [], {}
        for k in keys:
            d = np.array([r[k] for r in sel])
            fig[k] = {"mean": float(d.mean()), "match": float((d < threshold).mean())}
            cells.append(f"{d.mean():.3f} ({fig[k]['match']:.2f})")
        for u in UPSCALERS:
            fig[f"{u}_ms"] = float(np.median([r[f"{u}_ms"] for r in sel]))
        summary[size] = fig
        print(f"| {size} | " + " | ".join(cells) + f" | {fig['lanczos_ms']:.1f} | {fig['realesrgan_ms']:.0f} |")
    print("\nidentity gain of realesrgan over lanczos (mean distance lanczos - realesrgan; > 0: realesrgan closer)")
    for size in sizes:
        gains = {k: summary[size][f"lanczos_{k}"]["mean"] - summary[size][f"realesrgan_{k}"]["mean"]
                 for k in stages}  # fmt: skip
        print(f"  {size:>3} px: " + ", ".join(f"{k} {v:+.3f}" for k, v in gains.items()))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--style", default=default_style_path(), help="style image")
    parser.add_argument("--engine", default="classical", choices=("classical", "neural"))
    parser.add_argument("--threads", type=int, default=2, help="neural: onnxruntime threads")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (0: all)")
    parser.add_argument("--per-person", type=int, default=0, help="use at most N photos of each person (0: all)")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--reverse", action="store_true", help="take the photos in reverse order")
    parser.add_argument("--from-json", default="", help="print saved runs (--json files, comma-separated)")
    args = parser.parse_args()
    if args.from_json:
        saved = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]  # several: merged
        rows = {(r["photo"], r["size"]): r for run in saved for r in run["rows"]}
        summarize(list(rows.values()), saved[0].get("threshold", 0.6))
        return
    if not (FACES_DIR / "people").is_dir():
        raise SystemExit(f"no face photos at {FACES_DIR}/people (set STYLID_TEST_FACES)")
    analyzer = create_face_analyzer(FacesConfig(backend="dlib", upsample=1))
    style = _rgb(args.style)
    if args.engine == "neural":
        stylizer = STYLIZERS.create("neural", threads=args.threads, face_style_strength=None)
        aware = STYLIZERS.create("neural", threads=args.threads)  # its default face_style_strength
    else:
        stylizer = aware = ClassicalStylizer()
    restorers = {u: MosaicRestorer(aware, MosaicConfig(upscaler=u, max_face_px=max(SIZES) + 1)) for u in UPSCALERS}
    pipelines = {u: FaceDetailTransfer(r, FaceDetailConfig()) for u, r in restorers.items()}
    print(f"engine: {stylizer.name} ({stylizer.model})"
          f", style {Path(args.style).name}")  # fmt: skip
    photos = sorted((FACES_DIR / "people").glob("*.jpg"))
    if args.per_person:
        photos = [p for p in photos if int(p.stem.rsplit("__", 1)[1]) <= args.per_person]
    photos = (photos[::-1] if args.reverse else photos)[: args.limit or None]

    def dist(image: np.ndarray, keypoints: np.ndarray, ref: np.ndarray) -> float:
        return analyzer.distance(analyzer.embed(image, [keypoints])[0], ref)

    rows: list[dict] = []
    for path in photos:
        photo = _rgb(path)
        faces = analyzer.analyze(photo, max_faces=1)
        if not faces:
            print(f"{path.name}: no face at full resolution, skipped")
            continue
        ref = faces[0]
        for size in SIZES:
            scale = size / ref.size_px
            small = cv2.resize(photo, (max(8, round(photo.shape[1] * scale)), max(8, round(photo.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)  # fmt: skip
            sx, sy = small.shape[1] / photo.shape[1], small.shape[0] / photo.shape[0]
            kps = ref.keypoints * [sx, sy]
            box = (ref.box[0] * sx, ref.box[1] * sy, ref.box[2] * sx, ref.box[3] * sy)
            face = Face(box=box, keypoints=kps.astype(np.float32), score=1.0)
            region = (0, 0, small.shape[1], small.shape[0])
            row = {"photo": path.name, "size": size, "small": dist(small, kps, ref.embedding),
                   "plain": dist(stylizer.stylize(small, style, [face]), kps, ref.embedding)}  # fmt: skip
            for name, restorer in restorers.items():
                plan = restorer.plan(small.shape[1], small.shape[0], [face])
                if not plan.tiles:
                    break
                tile = plan.tiles[0]
                x0, y0, x1, y1 = tile.crop
                crop = np.ascontiguousarray(small[y0:y1, x0:x1])
                t0 = time.perf_counter()
                restorer._upscale(crop, tile.size)
                row[f"{name}_ms"] = 1000 * (time.perf_counter() - t0)
                if args.engine == "neural":
                    row[f"{name}_final"] = dist(pipelines[name].stylize(small, style, [face]), kps, ref.embedding)
                    continue
                canvas, canvas_faces = restorer.build_canvas(small, [face], plan)
                tile_kps = canvas_faces[-1].keypoints
                styled = stylizer.stylize(canvas, style, canvas_faces, content_region=region)
                row[f"{name}_tile"] = dist(canvas, tile_kps, ref.embedding)
                row[f"{name}_tile+cl"] = dist(styled, tile_kps, ref.embedding)
                row[f"{name}_final"] = dist(restorer.restore(styled, plan), kps, ref.embedding)
            rows.append(row)
        if args.json:  # after every photo, so an interrupted run keeps its rows
            Path(args.json).write_text(json.dumps({"rows": rows, "threshold": analyzer.match_threshold}, indent=1))
        print(f"{path.name}: " + ", ".join(f"{r['size']}px {r['lanczos_final']:.3f}/{r['realesrgan_final']:.3f}"
                                           for r in rows[-len(SIZES):]), flush=True)  # fmt: skip

    summary = summarize(rows, analyzer.match_threshold)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "threshold": analyzer.match_threshold, "summary": summary}, indent=1)
        )


if __name__ == "__main__":
    main()

"""Paint the bundled default style image, ``stylid_core/samples/style_painting.jpg``, from nothing but code.

A night landscape in thick impasto strokes: a swirling sky around a moon and stars, rolling hills, a dark cypress
in front. Each stroke is a short polyline that follows a flow field (vortices in the sky, the slopes' contours on
the hills), coloured from a smooth colour plan with a random jitter, drawn coarse to fine with a dark rim.
Seeded, so a rerun gives the same picture:

    python scripts/make_style_painting.py            # writes stylid_core/samples/style_painting.jpg
"""

from __future__ import annotations

import argparse
import os

import cv2
import numpy as np

SIZE = 640
VORTICES = ((0.30, 0.22, 1.0), (0.62, 0.30, -0.8), (0.86, 0.14, 0.6))  # x, y (fractions), strength (sign: turn)
MOON = (0.82, 0.16, 0.075)
STARS = ((0.12, 0.10), (0.47, 0.08), (0.40, 0.36), (0.70, 0.45), (0.20, 0.42))


def horizon(x: np.ndarray) -> np.ndarray:
    """Height (fraction of the image) of the hills' top edge at x (fraction)."""
    return 0.58 + 0.06 * np.sin(2.0 * np.pi * x * 1.3 + 0.7) + 0.03 * np.sin(2.0 * np.pi * x * 3.1)


def colour_plan(n: int) -> np.ndarray:
    """(n, n, 3) float RGB in [0, 1]: where the picture is sky, moon, stars, hills and cypress."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    sky = np.stack([0.10 + 0.25 * y, 0.20 + 0.35 * y, 0.55 + 0.25 * y], -1)
    swirl = np.zeros_like(x)
    for vx, vy, s in VORTICES:
        r = np.hypot(x - vx, y - vy)
        swirl += abs(s) * np.exp(-(((r - 0.09) / 0.035) ** 2))
    sky = sky + swirl[..., None] * (np.array([0.55, 0.65, 0.55]) - sky) * 0.8
    glow = np.zeros_like(x)
    for sx, sy in (*STARS, MOON[:2]):
        glow = np.maximum(glow, np.exp(-(np.hypot(x - sx, y - sy) / 0.035) ** 2))
    sky = sky + glow[..., None] * (np.array([0.98, 0.90, 0.45]) - sky)
    moon = np.hypot(x - MOON[0], y - MOON[1]) < MOON[2]
    sky[moon] = (1.0, 0.85, 0.30)
    top = horizon(x)
    depth = np.clip((y - top) / 0.4, 0, 1)[..., None]
    hills = (1 - depth) * np.array([0.20, 0.30, 0.45]) + depth * np.array([0.45, 0.40, 0.15])
    hills = hills + 0.08 * np.sin(2 * np.pi * (x * 2 + y * 5))[..., None] * np.array([1.0, 0.8, 0.2])
    image = np.where((y > top)[..., None], hills, sky)
    cypress = (np.abs(x - 0.16) < 0.07 * np.clip((y - 0.18) / 0.8, 0, 1) * (1 + 0.3 * np.sin(40 * y))) & (y > 0.18)
    image[cypress] = (0.08, 0.14, 0.10)
    return np.clip(image, 0, 1).astype(np.float32)


def flow_angle(px: float, py: float) -> float:
    """Stroke direction (radians) at a point (fractions): swirls in the sky, along the slopes on the hills."""
    if py > horizon(np.float32(px)):
        slope = (horizon(np.float32(px + 1e-3)) - horizon(np.float32(px))) / 1e-3
        return float(np.arctan(slope)) + 0.25 * np.sin(9 * py)
    if abs(px - 0.16) < 0.09 and py > 0.18:
        return np.pi / 2
    vx, vy = 1.0, 0.15 * np.sin(6 * px)  # drift to the right
    for cx, cy, s in VORTICES + (MOON,):
        dx, dy = px - cx, py - cy
        w = s * np.exp(-((np.hypot(dx, dy) / 0.16) ** 2)) * 6
        vx, vy = vx - w * dy / (np.hypot(dx, dy) + 1e-6), vy + w * dx / (np.hypot(dx, dy) + 1e-6)
    return float(np.arctan2(vy, vx))


def paint(n: int = SIZE, seed: int = 20261201) -> np.ndarray:
    """The painting as (n, n, 3) RGB uint8."""
    rng = np.random.default_rng(seed)
    plan = colour_plan(n)
    canvas = (cv2.GaussianBlur(plan, (0, 0), 6) * 255).astype(np.uint8)
    for width, count, length in ((11, 2600, 26), (7, 5200, 18), (4, 9000, 11)):
        for _ in range(count):
            x, y = rng.uniform(0, n), rng.uniform(0, n)
            colour = plan[int(y), int(x)] * (1 + rng.normal(0, 0.10, 3)) + rng.normal(0, 0.03, 3)
            points = [(x, y)]
            for _ in range(4):
                a = flow_angle(x / n, y / n)
                x, y = x + np.cos(a) * length / 4, y + np.sin(a) * length / 4
                points.append((x, y))
            pts = np.array(points, dtype=np.int32).reshape(-1, 1, 2)
            rim = tuple(int(v) for v in np.clip(colour * 0.55, 0, 1) * 255)
            body = tuple(int(v) for v in np.clip(colour, 0, 1) * 255)
            cv2.polylines(canvas, [pts], False, rim, width + 2, cv2.LINE_AA)
            cv2.polylines(canvas, [pts], False, body, width, cv2.LINE_AA)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--output", default=os.path.join(root, "stylid_core", "samples", "style_painting.jpg"))
    args = parser.parse_args()
    cv2.imwrite(args.output, cv2.cvtColor(paint(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

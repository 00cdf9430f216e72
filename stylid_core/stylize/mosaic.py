"""The mosaic restored content image (arXiv 2506.06802, section on small and distant faces).

Stylizers act at a fixed scale in pixels (filter sizes, or a diffusion model's receptive field), so a 24 px face
loses its identity to strokes a 200 px face shrugs off. ``MosaicRestorer`` wraps any ``Stylizer``:

1. **plan**: every face under ``max_face_px`` (the smallest ``max_faces`` of them) gets a square crop around its
   box grown by ``margin`` on each side, and a scale that makes the face ``target_face_px`` wide;
2. **build the canvas**: the full image at its own size in the top-left corner, the upscaled crops packed in
   columns to its right (the *mosaic*), the rest filled with the image's mean colour;
3. **stylize once**: the whole canvas goes through the wrapped stylizer in one call, so the faces and the
   background share one style (one set of statistics, one diffusion trajectory);
4. **restore**: each stylized crop is scaled back to its box (area interpolation) and blended into the stylized
   full image through a feathered mask that is 1 over the face and ramps to 0 over the crop's outer
   ``feather`` fraction, so no seam shows.

With an identity stylizer the output equals the input outside the crops exactly, and inside them up to the
up- and down-scaling round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from stylid_core.config import MosaicConfig
from stylid_core.faces.base import Face
from stylid_core.registry import Registry
from stylid_core.stylize.base import Stylizer

#: upscalers turn a crop (H, W, 3) uint8 into one of size (width, height)
Upscaler = Callable[[np.ndarray, tuple[int, int]], np.ndarray]
UPSCALERS: Registry[Callable[..., Upscaler]] = Registry(
    "face upscaler", modules={"realesrgan": "stylid_core.stylize.sr_upscaler"}
)


@UPSCALERS.register("lanczos")
def _lanczos(**_: object) -> Upscaler:
    return lambda crop, size: cv2.resize(crop, size, interpolation=cv2.INTER_LANCZOS4)


@UPSCALERS.register("bicubic")
def _bicubic(**_: object) -> Upscaler:
    return lambda crop, size: cv2.resize(crop, size, interpolation=cv2.INTER_CUBIC)


@dataclass
class MosaicTile:
    """One face's crop: where it is in the source image and where its upscaled copy sits in the canvas."""

    face_index: int
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 in the source image (clipped to it)
    scale: float
    position: tuple[int, int]  # top-left corner of the upscaled crop in the canvas
    size: tuple[int, int]  # width, height of the upscaled crop


@dataclass
class MosaicPlan:
    """The canvas layout for one image."""

    image_size: tuple[int, int]  # width, height of the source image
    canvas_size: tuple[int, int]  # width, height of the canvas
    tiles: list[MosaicTile]

    @property
    def face_indices(self) -> set[int]:
        return {t.face_index for t in self.tiles}


class MosaicRestorer(Stylizer):
    """Wraps a ``Stylizer`` so that small faces are stylized upscaled, in one canvas with the full image."""

    def __init__(self, stylizer: Stylizer, config: MosaicConfig | None = None) -> None:
        self.stylizer = stylizer
        self.config = config or MosaicConfig()
        self.name = stylizer.name
        self.model = stylizer.model
        self._upscale = UPSCALERS.create(self.config.upscaler, model=self.config.upscaler_model)

    # -- layout -------------------------------------------------------------------------------------------------
    def plan(self, width: int, height: int, faces: list[Face]) -> MosaicPlan:
        cfg = self.config
        small = [(i, f) for i, f in enumerate(faces) if 0 < f.size_px < cfg.max_face_px]
        small.sort(key=lambda item: item[1].size_px)
        small = small[: cfg.max_faces]
        tiles: list[MosaicTile] = []
        for i, face in small:
            x0, y0, x1, y1 = face.box
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            side = face.size_px * (1 + 2 * cfg.margin)
            cx0 = int(np.floor(max(0.0, cx - side / 2)))
            cy0 = int(np.floor(max(0.0, cy - side / 2)))
            cx1 = int(np.ceil(min(float(width), cx + side / 2)))
            cy1 = int(np.ceil(min(float(height), cy + side / 2)))
            if cx1 - cx0 < 2 or cy1 - cy0 < 2:
                continue
            scale = cfg.target_face_px / face.size_px
            size = (max(2, round((cx1 - cx0) * scale)), max(2, round((cy1 - cy0) * scale)))
            tiles.append(MosaicTile(face_index=i, crop=(cx0, cy0, cx1, cy1), scale=scale, position=(0, 0), size=size))
        # pack the tiles in columns to the right of the image, each column as tall as the image (or the tallest tile)
        panel_h = max([height] + [t.size[1] for t in tiles])
        x, y, col_w = width, 0, 0
        for tile in tiles:
            w, h = tile.size
            if y > 0 and y + h > panel_h:
                x, y, col_w = x + col_w, 0, 0
            tile.position = (x, y)
            y += h
            col_w = max(col_w, w)
        canvas_w = x + col_w if tiles else width
        canvas_h = panel_h if tiles else height
        return MosaicPlan(image_size=(width, height), canvas_size=(canvas_w, canvas_h), tiles=tiles)

    def build_canvas(self, content: np.ndarray, faces: list[Face], plan: MosaicPlan) -> tuple[np.ndarray, list[Face]]:
        """The mosaic canvas, and the faces in canvas coordinates (originals, then one per tile)."""
        w, h = plan.image_size
        cw, ch = plan.canvas_size
        # fill with the image itself, mirrored, so the canvas keeps the image's colour statistics and texture (a flat
        # fill would shift a global colour transfer and give a diffusion model an unnatural region to attend to)
        reps = (-(-ch // h), -(-cw // w), 1)
        canvas = np.tile(np.concatenate([content, content[::-1]], axis=0)[: 2 * h], (reps[0], reps[1], 1))[:ch, :cw]
        canvas = np.ascontiguousarray(canvas)
        canvas[:h, :w] = content
        canvas_faces = list(faces)
        for tile in plan.tiles:
            x0, y0, x1, y1 = tile.crop
            up = self._upscale(np.ascontiguousarray(content[y0:y1, x0:x1]), tile.size)
            px, py = tile.position
            canvas[py : py + tile.size[1], px : px + tile.size[0]] = up
            face = faces[tile.face_index]
            sx, sy = tile.size[0] / (x1 - x0), tile.size[1] / (y1 - y0)
            fx0, fy0, fx1, fy1 = face.box
            kps = (np.asarray(face.keypoints, dtype=np.float32) - [x0, y0]) * [sx, sy] + [px, py]
            canvas_faces.append(
                Face(
                    box=((fx0 - x0) * sx + px, (fy0 - y0) * sy + py, (fx1 - x0) * sx + px, (fy1 - y0) * sy + py),
                    keypoints=kps.astype(np.float32),
                    score=face.score,
                )
            )
        return canvas, canvas_faces

    def restore(self, stylized_canvas: np.ndarray, plan: MosaicPlan) -> np.ndarray:
        """Cut the stylized crops out of the canvas, scale them back and blend them into the stylized image."""
        w, h = plan.image_size
        out = stylized_canvas[:h, :w].astype(np.float32)
        for tile in plan.tiles:
            x0, y0, x1, y1 = tile.crop
            px, py = tile.position
            piece = stylized_canvas[py : py + tile.size[1], px : px + tile.size[0]]
            piece = cv2.resize(piece, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)
            mask = feather_mask(x1 - x0, y1 - y0, self.config.feather)[..., None]
            region = out[y0:y1, x0:x1]
            out[y0:y1, x0:x1] = region + mask * (piece - region)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    # -- Stylizer -----------------------------------------------------------------------------------------------
    def stylize(self, content: np.ndarray, style: np.ndarray, faces: list[Face] | None = None) -> np.ndarray:
        return self.stylize_batch([content], [style], [faces or []])[0]

    def stylize_batch(
        self, contents: list[np.ndarray], styles: list[np.ndarray], faces: list[list[Face]] | None = None
    ) -> list[np.ndarray]:
        faces = faces if faces is not None else [[] for _ in contents]
        plans, canvases, canvas_faces = [], [], []
        for content, fs in zip(contents, faces):
            plan = self.plan(content.shape[1], content.shape[0], fs)
            canvas, cfs = self.build_canvas(content, fs, plan)
            plans.append(plan)
            canvases.append(canvas)
            canvas_faces.append(cfs)
        regions = [(0, 0, *p.image_size) for p in plans] if self.stylizer.accepts_content_region else None
        stylized = self.stylizer.stylize_batch(canvases, styles, canvas_faces, content_regions=regions)
        return [self.restore(s, p) for s, p in zip(stylized, plans)]


def feather_mask(width: int, height: int, feather: float) -> np.ndarray:
    """A (height, width) float32 mask: 1 in the middle, linear ramps to 0 over ``feather`` of each side."""

    def ramp(n: int) -> np.ndarray:
        r = max(1.0, feather * n)
        idx = np.arange(n, dtype=np.float32) + 0.5
        return np.clip(np.minimum(idx, n - idx) / r, 0.0, 1.0)

    return np.minimum.outer(ramp(height), ramp(width)).astype(np.float32)

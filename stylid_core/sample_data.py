"""The bundled sample: real portraits, and scenes composed from them with faces at chosen sizes (24-96 px).

Scenes paste head-and-shoulders crops of the portraits, each scaled so its face box is an exact number of pixels,
onto a background made from the face-free part of a real photograph (``obama3.jpg``'s room, mirrored).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageFilter

#: person -> portrait file stem; the obama photos are three shots of one person
PORTRAITS = ("biden", "obama", "obama2", "obama3", "astronaut", "grace_hopper")
PERSON_OF = {"biden": "biden", "obama": "obama", "obama2": "obama", "obama3": "obama",
             "astronaut": "collins", "grace_hopper": "hopper"}  # fmt: skip
STYLE_FILE = "style_painting.jpg"


def _path(name: str) -> str:
    return str(resources.files("stylid_core") / "samples" / name)


def load_photo(stem: str) -> np.ndarray:
    """A bundled photo as RGB uint8."""
    return np.asarray(Image.open(_path(f"{stem}.jpg")).convert("RGB"))


def default_style_path() -> str:
    """Path of the bundled default style image."""
    return _path(STYLE_FILE)


def face_boxes() -> dict[str, list[int]]:
    with open(_path("faces.json")) as f:
        return json.load(f)


@dataclass
class PlacedFace:
    """Where a scene builder put a face: the portrait it came from and its face box in the scene."""

    stem: str
    box: tuple[float, float, float, float]
    scale: float = 1.0  # scene_xy = photo_xy * scale + offset
    offset: tuple[float, float] = (0.0, 0.0)

    def to_scene(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) points of the portrait photo into the scene."""
        return np.asarray(points, dtype=np.float32) * self.scale + np.asarray(self.offset, dtype=np.float32)

    @property
    def person(self) -> str:
        return PERSON_OF[self.stem]


def background(width: int, height: int) -> np.ndarray:
    """A real-photo background with no face in it: the left part of ``obama3.jpg`` (a room), mirrored and tiled."""
    room = Image.open(_path("obama3.jpg")).convert("RGB")
    strip = room.crop((0, 0, 85, room.height))
    tile = Image.new("RGB", (strip.width * 2, strip.height))
    tile.paste(strip, (0, 0))
    tile.paste(strip.transpose(Image.FLIP_LEFT_RIGHT), (strip.width, 0))
    scale = height / tile.height
    tile = tile.resize((max(1, round(tile.width * scale)), height), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    for x in range(0, width, tile.width):
        canvas.paste(tile, (x, 0))
    return np.asarray(canvas)


def place_face(scene: np.ndarray, stem: str, face_px: int, center: tuple[int, int]) -> PlacedFace:
    """Paste a head-and-shoulders crop of portrait ``stem`` into ``scene`` (in place), face box ``face_px`` wide,
    face centred at ``center``. The crop's edge is feathered so no hard rectangle surrounds the person."""
    photo = Image.open(_path(f"{stem}.jpg")).convert("RGB")
    x0, y0, x1, y1 = face_boxes()[stem]
    fw = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # crop: 1.1 face widths to each side, 0.9 above, 1.6 below (shoulders)
    crop_box = (cx - 1.6 * fw, cy - 1.4 * fw, cx + 1.6 * fw, cy + 2.1 * fw)
    crop = photo.crop(tuple(round(v) for v in crop_box))
    s = face_px / fw
    crop = crop.resize((max(1, round(crop.width * s)), max(1, round(crop.height * s))), Image.LANCZOS)
    # feathered alpha so the paste blends into the background
    alpha = Image.new("L", crop.size, 0)
    inner = max(1, round(0.12 * min(crop.size)))
    alpha.paste(255, (inner, inner, crop.width - inner, crop.height - inner))
    alpha = alpha.filter(ImageFilter.GaussianBlur(inner / 2))
    # face centre inside the resized crop
    fcx, fcy = (cx - crop_box[0]) * s, (cy - crop_box[1]) * s
    ox, oy = round(center[0] - fcx), round(center[1] - fcy)
    img = Image.fromarray(scene)
    img.paste(crop, (ox, oy), alpha)
    scene[...] = np.asarray(img)
    half = face_px / 2
    return PlacedFace(
        stem=stem,
        box=(center[0] - half, center[1] - half, center[0] + half, center[1] + half),
        scale=s,
        offset=(ox - round(crop_box[0]) * s, oy - round(crop_box[1]) * s),
    )


def build_scene(layout: list[tuple[str, int]], width: int = 0, height: int = 0) -> tuple[np.ndarray, list[PlacedFace]]:
    """A scene with one face per ``(stem, face_px)`` in ``layout``, laid out left to right in one row."""
    gap = 24
    widths = [round(3.2 * px) + gap for _, px in layout]
    width = width or max(320, sum(widths) + gap)
    tallest = max(px for _, px in layout)
    height = height or max(240, round(4.0 * tallest))
    scene = background(width, height).copy()
    placed = []
    x = gap
    for (stem, px), w in zip(layout, widths):
        center = (x + w // 2, round(height * 0.42))
        placed.append(place_face(scene, stem, px, center))
        x += w
    return scene, placed


#: the bundled scenes: group and distant shots with faces from 24 to 96 px
SCENES: dict[str, list[tuple[str, int]]] = {
    "scene_group_small": [("biden", 24), ("obama2", 32), ("grace_hopper", 40), ("astronaut", 48), ("obama", 64)],
    "scene_mixed": [("grace_hopper", 96), ("obama", 28), ("astronaut", 56), ("biden", 36)],
    "scene_distant": [("obama2", 24), ("biden", 28), ("astronaut", 26), ("grace_hopper", 30), ("obama", 34)],
}


def write_sample_set(directory: str) -> list[dict[str, str]]:
    """Write the bundled sample (portraits + scenes) as PNG/JPEG files into ``directory``; return manifest rows."""
    os.makedirs(directory, exist_ok=True)
    rows = []
    for stem in PORTRAITS:
        path = os.path.join(directory, f"{stem}.jpg")
        if not os.path.exists(path):
            Image.fromarray(load_photo(stem)).save(path, quality=92)
        rows.append({"image_id": stem, "image_uri": os.path.abspath(path)})
    for name, layout in SCENES.items():
        path = os.path.join(directory, f"{name}.png")
        if not os.path.exists(path):
            scene, _ = build_scene(layout)
            Image.fromarray(scene).save(path)
        rows.append({"image_id": name, "image_uri": os.path.abspath(path)})
    return rows


def write_face_crops(directory: str, count: int, side: int = 32, seed: int = 0) -> list[str]:
    """``count`` small face crops (``side`` px squares, PNG) cut from the bundled portraits around their face
    boxes, each with its own random shift, scale and brightness: a pre-cropped face set for scale runs. Returns
    the paths."""
    rng = np.random.default_rng(seed)
    boxes = face_boxes()
    photos = {stem: Image.open(_path(f"{stem}.jpg")).convert("RGB") for stem in PORTRAITS if stem in boxes}
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k in range(count):
        stem = list(photos)[k % len(photos)]
        x0, y0, x1, y1 = boxes[stem][:4]
        size = max(x1 - x0, y1 - y0) * rng.uniform(1.1, 1.4)
        cx = (x0 + x1) / 2 + rng.uniform(-0.05, 0.05) * size
        cy = (y0 + y1) / 2 + rng.uniform(-0.05, 0.05) * size
        crop = photos[stem].crop((round(cx - size / 2), round(cy - size / 2), round(cx + size / 2),
                                  round(cy + size / 2))).resize((side, side), Image.LANCZOS)  # fmt: skip
        pixels = np.clip(np.asarray(crop, np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"crop{k:05d}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths

"""The mosaic restored content image (arXiv 2506.06802, section on small and distant faces).

Stylizers act at a fixed scale in pixels (filter sizes, or a network's receptive field), so a 24 px face loses its
identity to strokes a 200 px face shrugs off. ``MosaicRestorer`` wraps any ``Stylizer``:

1. **plan, at the engine's working resolution**: every face under ``max_face_px`` (the smallest ``max_faces`` of
   them) gets a square crop around its box grown by ``margin`` on each side, and a scale that makes the face
   ``target_face_px`` wide *where the engine runs*: ``Stylizer.working_size`` says what size the engine resizes
   each input to (the classical engine: none; the neural engine: ``max_side``; the diffusion engine: its
   ``resolution``), and the tiles are sized so that after that resize the face is ``target_face_px``;
2. **lay out**, one of two ``layout`` values:

   - ``canvas``: the full image at its own size in the top-left corner, the upscaled crops packed in columns to its
     right; the rest of the canvas is filled with copies of the image (alternately mirrored upside down), so the
     canvas keeps the image's colour statistics and texture (a flat fill would shift a global colour transfer or
     instance normalization). The filler's own faces are never restored. The canvas is planned at the scale the
     engine gives the *canvas*; for an engine with a fixed working size that scale is smaller than the image's
     own, so the plan records ``image_scale`` (the image's scale in the canvas relative to stylizing it alone)
     and the image loses resolution;
   - ``sheet``: the image goes to the engine unchanged (exactly as without the mosaic: no shrinking, no change of
     aspect) and the tiles go on *sheets* of the image's own size, a copy of the image under them as filler,
     stylized in the same ``stylize_batch`` call with the same style. The engine gives a sheet the image's working
     scale, so tiles reach ``target_face_px`` at that scale whatever the engine's working size. For an engine that
     works at the input's own size (neural below its ``max_side``) each sheet is cut to the part its tiles use, and
     the image itself gets only the faces no tile restores (their identity-aware pass would be thrown away);

3. **stylize once**: the canvas (or image and sheets) go through the wrapped stylizer in one call, so the faces and
   the background share one style (one set of statistics, one network or diffusion batch); engines with
   ``accepts_content_region`` get the image's rectangle of the canvas, so tiles and filler do not shift the global
   statistics they take from the content;
4. **restore**: each stylized crop is scaled back to its box (area interpolation) and blended into the stylized
   full image through a mask (``restore_mask``):

   - ``ellipse`` (default): an ellipse over the face, 1 in its inner part and a smooth ramp to 0 at its rim, which
     stays inside the face box grown by 50% (``ELLIPSE_REACH``). Outside that the output is the plain stylization
     bit for bit: the tile's upscaled background, which the engine paints with finer strokes than the image's,
     never shows, and the mask has no straight edge;
   - ``box``: 1 over the face box and linear ramps to 0 over the crop's outer ``feather`` fraction. Its square
     ramp reaches the whole crop (twice the face with the default margin), where the tile's finer-painted
     background shows as a square halo around each face (issue "Faces that stay painted").

With an identity stylizer the output equals the input outside the crops exactly, and inside them up to the
up- and down-scaling round trip.

**Per-face closed loop** (``identity_loop``, sheet layout, off by default; docs/identity.md, "Per-face closed
loop"): instead of one rendering per tile, each face gets a ladder of candidates, most stylized first: its tile
rendered at each of ``strengths`` (an engine with ``accepts_face_style_overrides`` renders one copy of each sheet
per strength in the same batch, the whole sheet at that face style strength; the default's two runs per sheet, the
image's style and the face style, become the two default strengths, so the engine's cost is the same), then the
last strength's rendering with the photo's luminance detail at each of the ``detail`` amounts
(``face_detail.transfer_face_detail``, confined to the restore ellipse). Every candidate is restored into the
image and judged there by the job's recognizer (``recognizer``: its distance to the source face, against the
distance of the plain stylization's face) and by its fine photo-detail correlation
(``stylid_core.metrics.photo_detail_correlation``). ``choose_candidate`` picks the first candidate that wins back
``target`` of plain's distance with its fine correlation under ``detail_cap``; where none does, the nearest to the
source under the cap; where none is under the cap, the first. What was chosen, per face, is in ``last_choices``
(``LoopChoice``) after each ``stylize_batch``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from stylid_core.config import FaceDetailConfig, FacesConfig, MosaicConfig
from stylid_core.faces.base import Face, FaceAnalyzer
from stylid_core.registry import Registry
from stylid_core.stylize.base import Stylizer, StylizerWrapper

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
    scale: float  # upscaled crop px per source px (in the canvas or sheet, before the engine's own resize)
    position: tuple[int, int]  # top-left corner of the upscaled crop in the canvas or its sheet
    size: tuple[int, int]  # width, height of the upscaled crop
    sheet: int = -1  # the sheet it is on (``sheet`` layout), -1 in the canvas
    working_face_px: float = 0.0  # the face's size where the engine runs (target_face_px unless clamped)
    face_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # the face's box in the source image


@dataclass
class MosaicPlan:
    """The canvas layout for one image."""

    image_size: tuple[int, int]  # width, height of the source image
    canvas_size: tuple[int, int]  # width, height of the canvas (``sheet``: the image's, as is each sheet's)
    tiles: list[MosaicTile]
    layout: str = "canvas"
    sheets: int = 0  # number of tile sheets (``sheet`` layout)
    #: the engine's scale for the image inside the canvas relative to the image stylized alone (1.0: the mosaic
    #: costs the image no resolution; always 1.0 for ``sheet``, and for engines that run at the input's size)
    image_scale: float = 1.0

    @property
    def face_indices(self) -> set[int]:
        return {t.face_index for t in self.tiles}


@dataclass
class LoopCandidate:
    """One candidate rendering of a face in the closed loop, as judged: its face style strength (None: the engine's
    own rendering), the photo's detail amount on it, the job's recognizer's distance to the source face and its
    fine photo-detail correlation (None: no detail in the band)."""

    strength: float | None
    detail: float
    distance: float
    fine: float | None


@dataclass
class LoopChoice:
    """What the closed loop chose for one face: the candidate's strength and detail amount, its distance and the
    plain stylization's, its fine correlation, and why: ``target`` (the first to reach it under the cap), ``cap``
    (none reached it: the nearest under the cap), ``first`` (none under the cap) or ``no_keypoints``."""

    strength: float | None
    detail: float
    distance: float | None
    plain_distance: float | None
    fine: float | None
    reason: str
    index: int = 0  # the candidate's place in the ladder (0: the most stylized)


def choose_candidate(
    candidates: list[LoopCandidate], plain_distance: float, target: float, cap: float
) -> tuple[int, str]:
    """The closed loop's pick among ``candidates`` (most stylized first): the first whose distance to the source
    wins back ``target`` of ``plain_distance`` (``distance <= (1 - target) * plain_distance``) with its fine
    correlation at most ``cap``; else the nearest to the source among those under the cap; else the first.
    Returns (index, reason)."""
    if not candidates:
        raise ValueError("no candidates")
    under = [k for k, c in enumerate(candidates) if c.fine is None or c.fine <= cap]
    wanted = (1.0 - target) * plain_distance
    for k in under:
        if candidates[k].distance <= wanted:
            return k, "target"
    if under:
        return min(under, key=lambda k: (candidates[k].distance, k)), "cap"
    return 0, "first"


class MosaicRestorer(StylizerWrapper):
    """Wraps a ``Stylizer`` so that small faces are stylized upscaled, in one canvas with the full image."""

    def __init__(
        self,
        stylizer: Stylizer,
        config: MosaicConfig | None = None,
        recognizer: FaceAnalyzer | FacesConfig | None = None,
    ) -> None:
        """``recognizer``: the job's face analyzer (or its ``faces`` config, built on first use) that the closed
        loop judges candidates with; None builds ``FacesConfig()``'s (dlib) when the loop is on."""
        super().__init__(stylizer)
        self.config = config or MosaicConfig()
        self._upscale = UPSCALERS.create(self.config.upscaler, model=self.config.upscaler_model)
        self._recognizer = recognizer
        #: per image of the last ``stylize_batch``: face index -> ``LoopChoice`` (empty without the loop)
        self.last_choices: list[dict[int, LoopChoice]] = []

    @property
    def recognizer(self) -> FaceAnalyzer:
        if not isinstance(self._recognizer, FaceAnalyzer):
            from stylid_core.faces import create_face_analyzer

            self._recognizer = create_face_analyzer(self._recognizer or FacesConfig())
        return self._recognizer

    @property
    def loop(self) -> bool:
        return self.config.identity_loop.enabled and self.config.layout == "sheet"

    def _loop_strengths(self) -> list[float | None]:
        """The strengths each sheet is rendered at: the loop's with an engine that takes overrides, else [None]
        (the engine's own sheet rendering, its face style included)."""
        if self.loop and getattr(self.stylizer, "accepts_face_style_overrides", False):
            return list(self.config.identity_loop.strengths)
        return [None]

    # -- layout -------------------------------------------------------------------------------------------------
    def _engine_scale(self, width: int, height: int) -> float:
        """The factor by which the wrapped engine resizes an input of ``width`` x ``height`` (1.0: not at all)."""
        wh, ww = self.stylizer.working_size(height, width)
        return min(ww / width, wh / height)

    def _small_faces(self, width: int, height: int, faces: list[Face]) -> list[tuple[int, tuple[int, int, int, int]]]:
        cfg = self.config
        small = [(i, f) for i, f in enumerate(faces) if 0 < f.size_px < cfg.max_face_px]
        small.sort(key=lambda item: item[1].size_px)
        crops = []
        for i, face in small[: cfg.max_faces]:
            x0, y0, x1, y1 = face.box
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            side = face.size_px * (1 + 2 * cfg.margin)
            cx0 = int(np.floor(max(0.0, cx - side / 2)))
            cy0 = int(np.floor(max(0.0, cy - side / 2)))
            cx1 = int(np.ceil(min(float(width), cx + side / 2)))
            cy1 = int(np.ceil(min(float(height), cy + side / 2)))
            if cx1 - cx0 >= 2 and cy1 - cy0 >= 2:
                crops.append((i, (cx0, cy0, cx1, cy1)))
        return crops

    def plan(self, width: int, height: int, faces: list[Face]) -> MosaicPlan:
        """The layout for one image of ``width`` x ``height`` with ``faces`` (see the module docstring)."""
        crops = self._small_faces(width, height, faces)
        if not crops:
            size = (width, height)
            return MosaicPlan(image_size=size, canvas_size=size, tiles=[], layout=self.config.layout)
        if self.config.layout == "sheet":
            return self._plan_sheets(width, height, faces, crops)
        return self._plan_canvas(width, height, faces, crops)

    def _tiles(self, faces, crops, engine_scale: float, max_side: float | None = None) -> list[MosaicTile]:
        tiles = []
        for i, (x0, y0, x1, y1) in crops:
            scale = self.config.target_face_px / (faces[i].size_px * engine_scale)
            if max_side is not None:  # a tile must fit on a sheet
                scale = min(scale, max_side / max(x1 - x0, y1 - y0))
            size = (max(2, round((x1 - x0) * scale)), max(2, round((y1 - y0) * scale)))
            tiles.append(MosaicTile(i, (x0, y0, x1, y1), scale, (0, 0), size, face_box=faces[i].box))
            tiles[-1].working_face_px = faces[i].size_px * scale * engine_scale
        return tiles

    def _plan_canvas(self, width, height, faces, crops) -> MosaicPlan:
        image_scale = self._engine_scale(width, height)
        engine_scale = image_scale
        # the canvas is wider than the image, so an engine with a working size shrinks it more: iterate the tile
        # sizes to the canvas' own scale (a fixed point that the tiles approach from below; where they would need
        # more than the engine's whole working size, it does not exist and the rounds stop with smaller tiles)
        for _ in range(60):
            tiles = self._tiles(faces, crops, engine_scale)
            canvas_size = _pack_columns(tiles, width, height)
            new_scale = self._engine_scale(*canvas_size)
            if abs(new_scale - engine_scale) <= 1e-3 * engine_scale:
                break
            engine_scale = new_scale
        for tile in tiles:
            tile.working_face_px *= self._engine_scale(*canvas_size) / engine_scale
        return MosaicPlan(
            image_size=(width, height),
            canvas_size=canvas_size,
            tiles=tiles,
            layout="canvas",
            image_scale=self._engine_scale(*canvas_size) / image_scale,
        )

    def _plan_sheets(self, width, height, faces, crops) -> MosaicPlan:
        engine_scale = self._engine_scale(width, height)
        tiles = self._tiles(faces, crops, engine_scale, max_side=min(width, height))
        # shelf packing, largest first: rows of tiles left to right, a new sheet when the rows are full
        order = sorted(tiles, key=lambda t: -t.size[1])
        sheet, x, y, row_h = 0, 0, 0, 0
        for tile in order:
            w, h = tile.size
            if x + w > width:
                x, y, row_h = 0, y + row_h, 0
            if y + h > height:
                sheet, x, y, row_h = sheet + 1, 0, 0, 0
            tile.position, tile.sheet = (x, y), sheet
            x += w
            row_h = max(row_h, h)
        return MosaicPlan(
            image_size=(width, height), canvas_size=(width, height), tiles=tiles, layout="sheet", sheets=sheet + 1
        )

    def _paste_tiles(self, target: np.ndarray, content: np.ndarray, tiles, faces) -> list[Face]:
        """Paste the upscaled crops of ``tiles`` into ``target`` (in place); the faces in ``target`` coordinates."""
        pasted = []
        for tile in tiles:
            x0, y0, x1, y1 = tile.crop
            up = self._upscale(np.ascontiguousarray(content[y0:y1, x0:x1]), tile.size)
            px, py = tile.position
            target[py : py + tile.size[1], px : px + tile.size[0]] = up
            face = faces[tile.face_index]
            sx, sy = tile.size[0] / (x1 - x0), tile.size[1] / (y1 - y0)
            fx0, fy0, fx1, fy1 = face.box
            kps = (np.asarray(face.keypoints, dtype=np.float32) - [x0, y0]) * [sx, sy] + [px, py]
            pasted.append(
                Face(
                    box=((fx0 - x0) * sx + px, (fy0 - y0) * sy + py, (fx1 - x0) * sx + px, (fy1 - y0) * sy + py),
                    keypoints=kps.astype(np.float32),
                    score=face.score,
                )
            )
        return pasted

    def build_canvas(self, content: np.ndarray, faces: list[Face], plan: MosaicPlan) -> tuple[np.ndarray, list[Face]]:
        """The ``canvas`` layout's canvas, and the faces in canvas coordinates (originals, then one per tile)."""
        w, h = plan.image_size
        cw, ch = plan.canvas_size
        # filler: copies of the image, every other row of copies mirrored upside down (see the module docstring)
        reps = (-(-ch // h), -(-cw // w), 1)
        canvas = np.tile(np.concatenate([content, content[::-1]], axis=0)[: 2 * h], (reps[0], reps[1], 1))[:ch, :cw]
        canvas = np.ascontiguousarray(canvas)
        canvas[:h, :w] = content
        return canvas, list(faces) + self._paste_tiles(canvas, content, [t for t in plan.tiles if t.sheet < 0], faces)

    def build_sheets(
        self, content: np.ndarray, faces: list[Face], plan: MosaicPlan
    ) -> list[tuple[np.ndarray, list[Face]]]:
        """The ``sheet`` layout's sheets (a copy of the image under the tiles), each with its tiles' faces."""
        sheets = []
        # an engine that works at the input's own size (no resize) gets each sheet cut to the part its tiles use:
        # its time goes with the pixels, and a few small faces' tiles need far less than the image's size (tile
        # positions count from the top left, so they hold). An engine that resizes gets whole sheets, so a sheet is
        # worked at the image's scale, which the plan's tile sizes assume.
        native = self._engine_scale(*plan.image_size) >= 1.0 - 1e-9
        for k in range(plan.sheets):
            tiles = [t for t in plan.tiles if t.sheet == k]
            used_w = max(t.position[0] + t.size[0] for t in tiles) if native else plan.image_size[0]
            used_h = max(t.position[1] + t.size[1] for t in tiles) if native else plan.image_size[1]
            sheet = np.array(content[:used_h, :used_w], dtype=np.uint8, copy=True)
            sheets.append((sheet, self._paste_tiles(sheet, content, tiles, faces)))
        return sheets

    def _restore_mask(self, tile: MosaicTile) -> np.ndarray:
        x0, y0, x1, y1 = tile.crop
        if self.config.restore_mask == "ellipse":
            fx0, fy0, fx1, fy1 = tile.face_box
            return face_ellipse_mask(x1 - x0, y1 - y0, (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0))[..., None]
        return feather_mask(x1 - x0, y1 - y0, self.config.feather)[..., None]

    @staticmethod
    def _piece(source: np.ndarray, tile: MosaicTile) -> np.ndarray:
        """The tile's stylized crop cut out of its canvas or sheet and scaled back to the crop (float32)."""
        x0, y0, x1, y1 = tile.crop
        px, py = tile.position
        piece = source[py : py + tile.size[1], px : px + tile.size[0]]
        return cv2.resize(piece, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)

    def restore(
        self,
        stylized_canvas: np.ndarray,
        plan: MosaicPlan,
        sheets: list[np.ndarray] | list[list[np.ndarray]] | None = None,
        content: np.ndarray | None = None,
        faces: list[Face] | None = None,
        choices: dict[int, LoopChoice] | None = None,
    ):
        """Cut the stylized crops out of the canvas (or sheets), scale them back and blend them into the image.

        With the closed loop, ``sheets[k]`` is the list of sheet ``k``'s renderings (one per strength), and
        ``content``, ``faces`` are the image's: each face's candidate is chosen there (``choices`` gets them)."""
        w, h = plan.image_size
        out = stylized_canvas[:h, :w].astype(np.float32)
        for tile in plan.tiles:
            x0, y0, x1, y1 = tile.crop
            mask = self._restore_mask(tile)
            if tile.sheet >= 0 and sheets is not None and isinstance(sheets[tile.sheet], list):
                renderings = [self._piece(r, tile) for r in sheets[tile.sheet]]  # type: ignore[union-attr]
                piece, choice = self._choose(out, content, faces[tile.face_index], tile, mask, renderings)  # type: ignore[index, arg-type]
                if choices is not None:
                    choices[tile.face_index] = choice
            else:
                source = stylized_canvas if tile.sheet < 0 else sheets[tile.sheet]  # type: ignore[index]
                piece = self._piece(source, tile)  # type: ignore[arg-type]
            region = out[y0:y1, x0:x1]
            out[y0:y1, x0:x1] = region + mask * (piece - region)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    # -- the closed loop ------------------------------------------------------------------------------------------
    def _choose(
        self,
        out: np.ndarray,
        content: np.ndarray,
        face: Face,
        tile: MosaicTile,
        mask: np.ndarray,
        renderings: list[np.ndarray],
    ) -> tuple[np.ndarray, LoopChoice]:
        """The face's candidate pieces (crop-sized, float32) judged in the image (see the module docstring)."""
        from stylid_core.metrics import photo_detail_correlation
        from stylid_core.stylize.face_detail import transfer_face_detail

        cfg = self.config.identity_loop
        strengths = self._loop_strengths()
        x0, y0, x1, y1 = tile.crop
        # the ladder: each strength's rendering, then the last one with the photo's detail at each amount
        ladder: list[tuple[float | None, float, np.ndarray]] = [(s, 0.0, r) for s, r in zip(strengths, renderings)]
        if cfg.detail:
            crop_content = np.ascontiguousarray(content[y0:y1, x0:x1])
            fx0, fy0, fx1, fy1 = tile.face_box
            local = Face(box=(fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0), keypoints=None, score=1.0)
            last = np.clip(renderings[-1] + 0.5, 0, 255).astype(np.uint8)
            for amount in cfg.detail:
                detailed = transfer_face_detail(last, crop_content, [local], FaceDetailConfig(strength=amount))
                ladder.append((strengths[-1], float(amount), detailed.astype(np.float32)))
        kps = None if face.keypoints is None else np.asarray(face.keypoints, dtype=np.float32)
        if kps is None or kps.size == 0 or not np.any(kps):
            s, a, piece = ladder[0]
            return piece, LoopChoice(s, a, None, None, None, "no_keypoints")
        # each candidate restored into a window around the face (the box grown by its size a side: the crop and
        # the recognizer's aligned chip lie inside), the windows side by side in one image: one recognizer call
        h, w = out.shape[:2]
        size = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
        wx0, wy0 = max(0, int(np.floor(face.box[0] - size))), max(0, int(np.floor(face.box[1] - size)))
        wx1, wy1 = min(w, int(np.ceil(face.box[2] + size))), min(h, int(np.ceil(face.box[3] + size)))
        wx0, wy0, wx1, wy1 = min(wx0, x0), min(wy0, y0), max(wx1, x1), max(wy1, y1)
        ww = wx1 - wx0
        base = out[wy0:wy1, wx0:wx1]
        windows = [np.clip(base + 0.5, 0, 255).astype(np.uint8)]  # the plain stylization's face
        cy, cx = y0 - wy0, x0 - wx0
        for _, _, piece in ladder:
            win = base.copy()
            region = win[cy : cy + (y1 - y0), cx : cx + (x1 - x0)]
            win[cy : cy + (y1 - y0), cx : cx + (x1 - x0)] = region + mask * (piece - region)
            windows.append(np.clip(win + 0.5, 0, 255).astype(np.uint8))
        content_window = np.ascontiguousarray(content[wy0:wy1, wx0:wx1])
        box = (face.box[0] - wx0, face.box[1] - wy0, face.box[2] - wx0, face.box[3] - wy0)
        fines = [photo_detail_correlation(win, content_window, box).fine for win in windows[1:]]
        # only candidates under the cap can be chosen (or the first, where none is): only they are embedded
        judged = [k for k, f in enumerate(fines) if f is None or f <= cfg.detail_cap] or [0]
        recognizer = self.recognizer
        reference = face.embedding
        need_reference = reference is None or np.asarray(reference).size != recognizer.embedding_dim
        sent = [windows[0]] + [windows[1 + k] for k in judged] + ([content_window] if need_reference else [])
        strip = np.ascontiguousarray(np.concatenate(sent, axis=1))
        embeddings = recognizer.embed(strip, [kps - [wx0 - k * ww, wy0] for k in range(len(sent))])
        reference = embeddings[-1] if need_reference else np.asarray(reference, dtype=np.float32)
        plain_distance = float(recognizer.distance(embeddings[0], reference))
        distances = [np.inf] * len(ladder)  # not embedded: over the cap, never chosen
        for k, e in zip(judged, embeddings[1:]):
            distances[k] = float(recognizer.distance(e, reference))
        candidates = [LoopCandidate(s, a, d, f) for (s, a, _), d, f in zip(ladder, distances, fines)]
        k, reason = choose_candidate(candidates, plain_distance, cfg.target, cfg.detail_cap)
        c = candidates[k]
        return ladder[k][2], LoopChoice(c.strength, c.detail, c.distance, plain_distance, c.fine, reason, k)

    # -- Stylizer -----------------------------------------------------------------------------------------------
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return self.stylizer.working_size(height, width)

    def stylize_batch(
        self, contents: list[np.ndarray], styles: list[np.ndarray], faces: list[list[Face]] | None = None
    ) -> list[np.ndarray]:
        faces = faces if faces is not None else [[] for _ in contents]
        plans = []
        # everything goes to the engine in one call: canvases (or images), then every image's sheets
        inputs, input_styles, input_faces, regions = [], [], [], []
        for content, style, fs in zip(contents, styles, faces):
            plan = self.plan(content.shape[1], content.shape[0], fs)
            plans.append(plan)
            if plan.layout == "canvas":
                canvas, cfs = self.build_canvas(content, fs, plan)
                inputs.append(canvas)
                input_faces.append(cfs)
            else:
                # the faces the tiles restore are not the image's to render: only the others get the engine's
                # identity-aware treatment there (neural: a second transfer run for face_style_strength)
                inputs.append(content)
                input_faces.append([f for i, f in enumerate(fs) if i not in plan.face_indices])
            input_styles.append(style)
            regions.append((0, 0, *plan.image_size))
        # the closed loop renders each sheet once per strength (an override each; None: the engine's own way)
        strengths = self._loop_strengths() if self.loop else [None]
        overrides: list[float | None] = [None] * len(inputs)
        # per image, per sheet: the inputs holding its renderings (one without the loop)
        sheet_slots: list[list[list[int]]] = [[] for _ in contents]
        for k, (content, style, fs, plan) in enumerate(zip(contents, styles, faces, plans)):
            if plan.layout == "sheet" and plan.tiles:
                for sheet, sfs in self.build_sheets(content, fs, plan):
                    sheet_slots[k].append([])
                    for strength in strengths:
                        sheet_slots[k][-1].append(len(inputs))
                        inputs.append(sheet)  # the same array: the engine computes its content vector once
                        input_styles.append(style)
                        input_faces.append(sfs if strength is None else [])
                        regions.append(None)
                        overrides.append(strength)
        kwargs: dict = {}
        if any(o is not None for o in overrides):
            kwargs["face_style_overrides"] = overrides
        if self.stylizer.accepts_content_region:  # engines without them may implement the three-argument call
            kwargs["content_regions"] = regions
        stylized = self.stylizer.stylize_batch(inputs, input_styles, input_faces, **kwargs)
        if not self.loop:
            self.last_choices = [{} for _ in plans]
            return [self.restore(stylized[k], plan, [stylized[slots[0]] for slots in sheet_slots[k]])
                    for k, plan in enumerate(plans)]  # fmt: skip
        results, self.last_choices = [], []
        for k, plan in enumerate(plans):
            chosen: dict[int, LoopChoice] = {}
            sheets = [[stylized[j] for j in slots] for slots in sheet_slots[k]]
            results.append(self.restore(stylized[k], plan, sheets, contents[k], faces[k], chosen))
            self.last_choices.append(chosen)
        return results


def _pack_columns(tiles: list[MosaicTile], width: int, height: int) -> tuple[int, int]:
    """Pack ``tiles`` in columns to the right of a ``width`` x ``height`` image (sets their positions); returns the
    canvas size. Each column is as tall as the image (or the tallest tile)."""
    panel_h = max([height] + [t.size[1] for t in tiles])
    x, y, col_w = width, 0, 0
    for tile in tiles:
        w, h = tile.size
        if y > 0 and y + h > panel_h:
            x, y, col_w = x + col_w, 0, 0
        tile.position = (x, y)
        y += h
        col_w = max(col_w, w)
    return (x + col_w if tiles else width), (panel_h if tiles else height)


def feather_mask(width: int, height: int, feather: float) -> np.ndarray:
    """A (height, width) float32 mask: 1 in the middle, linear ramps to 0 over ``feather`` of each side."""

    def ramp(n: int) -> np.ndarray:
        r = max(1.0, feather * n)
        idx = np.arange(n, dtype=np.float32) + 0.5
        return np.clip(np.minimum(idx, n - idx) / r, 0.0, 1.0)

    return np.minimum.outer(ramp(height), ramp(width)).astype(np.float32)


#: the ellipse mask's semi-axes, as a fraction of the face box's width and height: its rim stays inside the box
#: grown by 50% (semi-axes 0.75), so nothing outside that changes
ELLIPSE_REACH = 0.74
#: the inner part of the ellipse (normalised radius) where the mask is 1; from there a smoothstep ramps it to 0
ELLIPSE_CORE = 0.6


def face_ellipse_mask(width: int, height: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """A (height, width) float32 mask over the face ``box`` (in these pixels): 1 inside the ellipse's inner
    ``ELLIPSE_CORE`` of its radius, a smoothstep to 0 at its rim (semi-axes ``ELLIPSE_REACH`` of the box's
    width and height), 0 beyond."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ax, ay = max(0.5, ELLIPSE_REACH * (x1 - x0)), max(0.5, ELLIPSE_REACH * (y1 - y0))
    xs = (np.arange(width, dtype=np.float32) + 0.5 - cx) / ax
    ys = (np.arange(height, dtype=np.float32) + 0.5 - cy) / ay
    r = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    t = np.clip((1.0 - r) / (1.0 - ELLIPSE_CORE), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)

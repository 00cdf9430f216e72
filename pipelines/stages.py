"""The Ray Data stages every job's chain is made of (``pipelines.chain``), and the rules they share: reading an image,
writing one, scrubbing errors, re-detecting a face in an output of a new pose (``redetect``).

Over 400 lines by reason: the stages are one set (``stylid run``, ``score`` and ``customize`` configure the same
load, face, score and write stages; only stylize and generate are a job's own), their per-row contract (``Row``,
``FrameStage``, ``_fail``) and the read/write/key/re-detection rules are what every stage uses, and
``FusedCPUStage`` chains them by their ``rows`` methods; split across files, each stage would import the others'
internals.

Each stage does its heavy set-up once per worker in ``__init__`` (model loads), processes one pandas batch per
``__call__``, and catches bad data per row: a row that fails gets ``status``/``error`` and flows on, untouched by
the stages after it. Rows whose ``status`` is not ``ok`` pass through every stage unchanged. Resources (CPUs,
GPUs, batch size, pool size) come from ``JobConfig.resources`` and are applied by the chain builder
(``pipelines.chain``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.schema import (
    FACE_COLUMNS,
    METRICS_COLUMNS,
    derive_image_id,
    face_rows_type,
    object_key,
    to_table,
    to_table_of_rows,
)
from stylid_core.boxes import box_iou
from stylid_core.config import FacesConfig, IOConfig, ScoreConfig, StylizeConfig
from stylid_core.faces import Face, FaceAnalyzer, create_face_analyzer, size_bucket
from stylid_core.faces.base import cosine_similarity
from stylid_core.imageio import ImageDecodeError, decode_image_bounded, encode_jpeg, encode_png, resize
from stylid_core.ledger import FACE_ROWS
from stylid_core.metrics import (
    PhotoDetailCorrelation,
    colour_distance,
    content_similarity,
    photo_detail_correlation,
)
from stylid_core.report import LargestFaces, SmallestFaces, zoom_strip
from stylid_core.sample_data import default_style_path
from stylid_core.secrets import scrub, secret_values
from stylid_core.storage import StorageError, join, local_path, read_bytes, write_bytes
from stylid_core.style_judge import StyleJudge
from stylid_core.stylize import STYLIZERS, Stylizer
from stylid_core.stylize.classical import lab_statistics
from stylid_core.stylize.face_detail import FaceDetailTransfer
from stylid_core.stylize.mosaic import MosaicRestorer

if TYPE_CHECKING:
    from pipelines.shard_writers import ShardWriters

log = logging.getLogger(__name__)

#: concurrent reads of one load batch (fsspec reads wait on I/O, not on the CPU)
READ_THREADS = 8


def _one_thread_for_opencv() -> None:
    """Actors are sized in CPUs by Ray; OpenCV would otherwise start a thread per core in every actor."""
    import cv2

    cv2.setNumThreads(1)


#: each pixel column and the row columns that hold its width and height. An output without sizes of its own
#: (``stylid run``'s stylized pixels) has the source's size.
PIXEL_SIZE_COLUMNS: dict[str, tuple[str, str]] = {
    "pixels": ("width", "height"),
    "out_pixels": ("out_width", "out_height"),
    "plain_pixels": ("width", "height"),
    "ref_pixels": ("ref_width", "ref_height"),
    "pose_pixels": ("pose_width", "pose_height"),  # stylid customize: the target pose
    "gen_pixels": ("gen_width", "gen_height"),  # stylid customize: k generated images a row (list columns)
}


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)


def image_of(row: Any, column: str = "pixels") -> np.ndarray:
    """The RGB image a row carries in ``column`` (raw bytes plus its width and height, ``PIXEL_SIZE_COLUMNS``)."""
    w_col, h_col = PIXEL_SIZE_COLUMNS.get(column, ("width", "height"))
    if not _present(row.get(w_col)):
        w_col, h_col = "width", "height"
    return np.frombuffer(row[column], dtype=np.uint8).reshape(int(row[h_col]), int(row[w_col]), 3)


class ImageColumn(NamedTuple):
    """One image a row refers to: the URI column it is read from and the pixel column it is decoded into."""

    uri: str
    pixels: str
    required: bool = True  # an empty URI fails the row (``missing``); else the image is skipped

    @property
    def size_columns(self) -> tuple[str, str]:
        return PIXEL_SIZE_COLUMNS.get(self.pixels, ("width", "height"))


#: ``stylid run`` reads one image a row, the source
SOURCE_IMAGE: tuple[ImageColumn, ...] = (ImageColumn("image_uri", "pixels"),)


#: one record of a batch as the stages work on it: column name -> plain Python value (None for null); the parsed
#: faces may stand in ``faces_json`` as a list of dicts (``face_records``), turned back into JSON at the Arrow boundary
Row = dict[str, Any]


def _fail(row: Row, status: str, error: str) -> None:
    row["status"] = status
    row["error"] = error[:2000]


def face_records(row: Row) -> list[dict]:
    """The row's faces (``Face.to_dict`` records, with what later stages added: ``in_mosaic``, ``scores``), parsed
    from ``faces_json`` once and kept parsed in the row: the stages of one actor change them in place and the JSON is
    written only where the batch leaves as an Arrow table (``rows_table``)."""
    value = row.get("faces_json")
    if isinstance(value, str):
        value = row["faces_json"] = json.loads(value)
    return value or []


def rows_table(rows: list[Row], names: list[str], columns: dict[str, pa.DataType] | None = None) -> pa.Table:
    """``rows`` as an Arrow table of the columns ``names`` (typed from ``columns``, default ``RECORD_COLUMNS``; absent
    values null), parsed faces written back as JSON."""
    for row in rows:
        if isinstance(row.get("faces_json"), list):
            row["faces_json"] = json.dumps(row["faces_json"])
    return to_table_of_rows(rows, names, columns)


def decode_work_image(data: bytes, io: IOConfig, uri: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The one decode of every job's input images: safe (``io.max_pixels``, ``io.max_bytes``), RGB, downscaled to
    ``io.max_work_pixels``; (image, the source's own (width, height)). Errors name ``uri``."""
    return decode_image_bounded(data, io.max_pixels, io.max_bytes, io.max_work_pixels, uri)


def read_image(uri: str, io: IOConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """``uri``'s bytes (transient failures retried: ``io.retry``) decoded by ``decode_work_image``; a
    ``StorageError`` or ``ImageDecodeError`` (each with the row ``status``) for an image that cannot be used."""
    return decode_work_image(read_bytes(uri, io.storage_options, io.max_bytes, io.retry), io, uri)


def put_image(
    output_uri: str, image_id: str, suffix: str, image: np.ndarray, io: IOConfig, ext: str | None = None
) -> str:
    """The one image write of every job: ``<output>/images/<object_key(image_id)><suffix>.<ext>`` (``ext``: default
    ``io.image_format``) in one put, transient failures retried (``io.retry``); returns its URI. The key rule keeps
    any id (``../x``, ``a/b``) under ``images/``."""
    ext = ext or io.image_format
    data = encode_png(image) if ext == "png" else encode_jpeg(image, 92)
    uri = join(output_uri, "images", f"{object_key(str(image_id))}{suffix}.{ext}")
    write_bytes(uri, data, io.storage_options, io.retry)
    return uri


def scrub_errors(rows: list[Row], io: IOConfig) -> None:
    """Every row's ``error`` without the credentials of ``io.storage_options`` (a message may quote them)."""
    secrets = secret_values(io.storage_options)
    for row in rows:
        if isinstance(row.get("error"), str):
            row["error"] = scrub(row["error"], secrets)


class FrameStage:
    """A stage that adds columns (``adds``) to each row of a batch: ``rows`` does the work on plain dicts (``Row``),
    in place; called as Ray's ``map_batches`` function, a stage takes its batch (pandas) and returns the typed
    Arrow table. ``FusedCPUStage`` chains the stages' ``rows`` and converts once, at the end: a pandas cell read or
    write costs tens of microseconds (Arrow-backed strings more), a dict item well under one."""

    adds: tuple[str, ...] = ()
    #: the types of the columns (``pipelines.schema``; None: ``RECORD_COLUMNS``, every job's)
    columns: dict[str, pa.DataType] | None = None

    def rows(self, rows: list[Row]) -> list[Row]:
        raise NotImplementedError

    def start(self, rows: list[Row]) -> list[Row]:
        """Every row with this stage's columns reset to null (a row that fails keeps them null)."""
        empty = dict.fromkeys(self.adds)
        for row in rows:
            row.update(empty)
        return rows

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        table = to_table(df, self.columns)
        names = list(dict.fromkeys([*table.column_names, *self.adds]))
        return rows_table(self.rows(table.to_pylist()), names, self.columns)


class StyleCache:
    """Style images loaded once per worker and kept (a few distinct styles serve a whole dataset)."""

    def __init__(self, io: IOConfig, capacity: int = 16) -> None:
        self.io = io
        self.capacity = capacity
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._statistics: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, uri: str) -> np.ndarray:
        if uri in self._images:
            self._images.move_to_end(uri)
            return self._images[uri]
        data = read_bytes(uri, self.io.storage_options, self.io.max_bytes, self.io.retry)
        # style statistics and the engines' style inputs need no more than the working resolution
        image, _ = decode_image_bounded(data, self.io.max_pixels, self.io.max_bytes, self.io.max_work_pixels, uri)
        self._images[uri] = image
        if len(self._images) > self.capacity:
            evicted, _ = self._images.popitem(last=False)
            self._statistics.pop(evicted, None)
        return image

    def statistics(self, uri: str) -> tuple[np.ndarray, np.ndarray]:
        """The style's Lab mean and deviation (``lab_statistics``), computed once per style and worker."""
        image = self.get(uri)
        if uri not in self._statistics:
            self._statistics[uri] = lab_statistics(image)
        return self._statistics[uri]


def string_column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    """``table``'s column ``name`` as one string array; all null where ``table`` has no such column."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    col = table.column(name)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col if col.type == pa.string() else col.cast(pa.string())


def prepare_manifest(table: pa.Table, default_style_uri: str | None) -> pa.Table:
    """Manifest rows (an Arrow table or batch) as the record's first columns: ``image_id`` (a hash of the URI where
    absent or empty), ``image_uri``, the effective ``style_uri`` (the row's, else the config's, else the bundled
    style), ``status`` (``missing`` for an empty URI) and ``error``. Vectorized: a million rows in about a second,
    Python code only for the ids that must be derived."""
    n = table.num_rows
    default_style_uri = default_style_uri or default_style_path()
    names = table.column_names

    uris = string_column(table, "image_uri")
    empty_uri = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(uris), ""), True)
    id_type = table.schema.field("image_id").type if "image_id" in names else pa.null()
    # ids that are not strings (numbers, say) are not used, as before: the row's id is derived from its URI
    text_ids = pa.types.is_string(id_type) or pa.types.is_large_string(id_type)
    ids = string_column(table, "image_id") if text_ids else pa.nulls(n, pa.string())
    derive = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ids), ""), True)
    if pc.any(derive).as_py():
        # str(None) for a missing URI, as the pandas form did: two such rows collide and are reported as duplicates
        derived = [derive_image_id(str(u)) for u in uris.filter(derive).to_pylist()]
        ids = pc.replace_with_mask(ids, derive, pa.array(derived, pa.string()))
    styles = string_column(table, "style_uri")
    no_style = pc.fill_null(pc.equal(styles, ""), True)
    styles = pc.if_else(no_style, pa.scalar(default_style_uri), styles)
    status = pc.if_else(empty_uri, pa.scalar("missing"), pa.scalar("ok"))
    error = pc.if_else(empty_uri, pa.scalar("empty image_uri"), pa.scalar(None, pa.string()))
    return pa.table({"image_id": ids, "image_uri": uris, "style_uri": styles, "status": status, "error": error})


def prepare_rows(df: pd.DataFrame, default_style_uri: str | None, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """``prepare_manifest`` of a pandas frame, as a frame; the ``keep`` columns are carried along (``stylid
    score``'s ``output_uri``, ``reference_uri``)."""
    df = df.reset_index(drop=True)
    out = prepare_manifest(pa.Table.from_pandas(df, preserve_index=False), default_style_uri).to_pandas()
    for col in keep:
        out[col] = df[col].to_numpy()
    return out


class LoadStage(FrameStage):
    """Reads each image's bytes through fsspec (transient failures retried) and decodes it safely to RGB
    (``stylid_core.imageio``), downscaled to ``io.max_work_pixels``: the size columns hold the working size,
    ``source_width``/``source_height`` the source image's own. Every error message names the image's URI.

    ``images`` names the images of a row (``ImageColumn``: the URI column read, the pixel column decoded into,
    whether an empty URI fails the row; default: the source, ``image_uri`` -> ``pixels``); ``stylid score`` also
    reads the output to score and the identity reference, ``stylid customize`` the reference and the target pose
    (``reference_uri`` -> ``ref_pixels``, ``pose_uri`` -> ``pose_pixels``). The first image's own size is the
    row's ``source_width``/``source_height``. All reads of a batch run concurrently. A row fails at its first image
    that cannot be read or decoded (its ``status``: ``missing``, ``forbidden``, ``read_error``, ``decode_error``,
    ``too_large``; ``load_error`` for anything else); the error names the URI column for any image but the first.
    """

    def __init__(self, io: IOConfig, images: tuple[ImageColumn, ...] = SOURCE_IMAGE) -> None:
        self.io = io
        self.images = tuple(ImageColumn(*im) for im in images)
        names = [col for im in self.images for col in (im.pixels, *im.size_columns)]
        self.adds = tuple(dict.fromkeys([*names, "source_width", "source_height", "t_load"]))

    def rows(self, rows: list[Row]) -> list[Row]:
        self.start(rows)
        todo = []  # (row, image) pairs to read
        for row in rows:
            if row["status"] != "ok":
                continue
            for k, im in enumerate(self.images):
                uri = row.get(im.uri)
                if isinstance(uri, str) and uri.strip():
                    todo.append((row, k))
                elif im.required:
                    _fail(row, "missing", f"empty {im.uri}")
                    break
        todo = [(row, k) for row, k in todo if row["status"] == "ok"]
        reads = self._read_all([row[self.images[k].uri] for row, k in todo])
        for (row, k), (data, read_s) in zip(todo, reads):
            if row["status"] != "ok":
                continue  # an earlier image of this row failed
            im = self.images[k]
            uri = row[im.uri]
            prefix = "" if k == 0 else f"{im.uri} "
            t0 = time.perf_counter() - read_s
            try:
                if isinstance(data, Exception):
                    raise data
                image, source_size = decode_work_image(data, self.io, uri)
            except (StorageError, ImageDecodeError) as exc:
                _fail(row, exc.status, prefix + (str(exc) if uri in str(exc) else f"{uri}: {exc}"))
                continue
            except Exception as exc:  # anything else is still this row's problem only
                _fail(row, "load_error", f"{prefix}{uri}: {type(exc).__name__}: {exc}")
                continue
            if k == 0:  # the row's own image: its output is written back at this size
                row["source_width"], row["source_height"] = source_size
            w_col, h_col = im.size_columns
            row[h_col], row[w_col] = image.shape[:2]
            row[im.pixels] = image.tobytes()
            row["t_load"] = (row["t_load"] or 0.0) + time.perf_counter() - t0
        return rows

    def _read_all(self, uris: list[str]) -> list[tuple[bytes | Exception, float]]:
        """Each URI's bytes (or the exception reading it raised) and seconds taken, read concurrently unless all are
        local files: on an object store a batch then waits about one request's latency instead of one per row."""

        def read(uri: str) -> tuple[bytes | Exception, float]:
            t0 = time.perf_counter()
            try:
                data = read_bytes(uri, self.io.storage_options, self.io.max_bytes, self.io.retry)
                return data, time.perf_counter() - t0
            except Exception as exc:  # raised again for its row, which fails alone
                return exc, time.perf_counter() - t0

        if len(uris) <= 1 or all(local_path(u) is not None for u in uris):
            return [read(u) for u in uris]  # local files: a read is a few microseconds of I/O, threads only cost
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(uris))) as pool:
            return list(pool.map(read, uris))


class FaceStage(FrameStage):
    """Detects faces, places keypoints and embeds them with the configured ``FaceAnalyzer`` (CPU actors).

    Faces are found in the row's identity reference when it carries one (``ref_pixels``: ``stylid score`` of a
    customization output, ``stylid customize``'s reference), else in the source (``pixels``): the largest
    ``max_faces`` (default ``faces.max_faces``; ``stylid customize`` keeps the reference's largest face), with their
    dense landmarks in the records when ``landmarks`` is set and the backend has them.
    """

    def __init__(self, faces: FacesConfig, max_faces: int | None = None, landmarks: bool = False) -> None:
        _one_thread_for_opencv()
        self.config = faces
        self.max_faces = faces.max_faces if max_faces is None else max_faces
        self.landmarks = landmarks
        self.analyzer: FaceAnalyzer = create_face_analyzer(faces)

    adds = ("n_faces", "n_faces_detected", "faces_json", "t_faces")

    def rows(self, rows: list[Row]) -> list[Row]:
        self.start(rows)
        for row in rows:
            if row["status"] != "ok":
                continue
            t0 = time.perf_counter()
            from_reference = isinstance(row.get("ref_pixels"), bytes)
            try:
                image = image_of(row, "ref_pixels" if from_reference else "pixels")
                detected = self.analyzer.detect(image)
                detected.sort(key=lambda f: -f.size_px)
                faces = detected[: self.max_faces]
                if faces:
                    for face, emb in zip(faces, self.analyzer.embed(image, [f.keypoints for f in faces])):
                        face.embedding = emb
            except Exception as exc:
                _fail(row, "face_error", f"{type(exc).__name__}: {exc}")
                continue
            row["n_faces_detected"] = len(detected)
            row["n_faces"] = len(faces)
            row["faces_json"] = [self._record(f) for f in faces]  # parsed; JSON where the batch leaves (rows_table)
            row["t_faces"] = time.perf_counter() - t0
            if not faces:
                _fail(row, "no_face", "no face detected" + (" in the reference image" if from_reference else ""))
        return rows

    def _record(self, face: Face) -> dict:
        record = face.to_dict()
        if self.landmarks and face.landmarks is not None:
            record["landmarks"] = np.asarray(face.landmarks, float).tolist()
        return record


def faces_of(row: Row) -> list[Face]:
    """The row's faces as ``Face`` objects (``face_records``)."""
    return [Face.from_dict(d) for d in face_records(row)]


class StylizeStage(FrameStage):
    """Stylizes each image after its style with the configured engine, wrapped in the ``MosaicRestorer`` and the
    face detail transfer (``stylid_core.stylize.face_detail``) when they are on.

    The engine is built once per actor; a batch goes to the engine in one ``stylize_batch`` call (one UNet batch
    for the diffusion engine). If that call fails, the rows are retried one by one so only the bad row fails.
    """

    def __init__(
        self, stylize: StylizeConfig, score: ScoreConfig, io: IOConfig, faces: FacesConfig | None = None
    ) -> None:
        _one_thread_for_opencv()
        self.config = stylize
        self.compare = score.compare_without_mosaic
        self.stylizer: Stylizer = STYLIZERS.create(stylize.engine, **stylize.options)
        # faces: the job's recognizer, which the mosaic's closed loop (identity_loop) judges its candidates with
        self.restorer = MosaicRestorer(self.stylizer, stylize.mosaic, faces) if stylize.mosaic.enabled else None
        self.detail = stylize.face_detail.strength > 0
        chain: Stylizer = self.restorer or self.stylizer
        self.chain: Stylizer = FaceDetailTransfer(chain, stylize.face_detail) if self.detail else chain
        self.styles = StyleCache(io)

    def _run(self, images, styles, faces) -> list[tuple[np.ndarray, np.ndarray | None, set[int], dict]]:
        """(output, output of the engine alone or None, indices of the faces that went into the mosaic, the closed
        loop's choice per face index: empty without the loop) per image.

        The engine-alone output (no mosaic, no detail transfer: the ``*_no_mosaic`` scores) is computed only for
        images whose faces the restoration touched."""
        if self.restorer is not None:
            tiles = [self.restorer.plan(im.shape[1], im.shape[0], fs).face_indices for im, fs in zip(images, faces)]
        else:
            tiles = [set() for _ in images]
        outs = self.chain.stylize_batch(images, styles, faces)
        loops = list(self.restorer.last_choices) if self.restorer is not None else [{} for _ in images]
        plains: list[np.ndarray | None] = [None] * len(images)
        if self.compare and self.chain is not self.stylizer:
            need = [k for k, t in enumerate(tiles) if t or (self.detail and faces[k])]
            if need:
                done = self.stylizer.stylize_batch(
                    [images[k] for k in need], [styles[k] for k in need], [faces[k] for k in need]
                )
                for k, out in zip(need, done):
                    plains[k] = out
        return list(zip(outs, plains, tiles, loops))

    adds = ("out_pixels", "plain_pixels", "mosaic_faces", "t_stylize", "engine", "model")

    def rows(self, rows: list[Row]) -> list[Row]:
        self.start(rows)
        todo, images, styles, faces = [], [], [], []
        for row in rows:
            row["engine"] = self.stylizer.name
            row["model"] = self.stylizer.model
            if row["status"] != "ok":
                continue
            uri = row["style_uri"]
            try:
                styles.append(self.styles.get(uri))
            except (StorageError, ImageDecodeError) as exc:
                _fail(row, "style_error", f"style image {exc}" if uri in str(exc) else f"style image {uri}: {exc}")
                continue
            todo.append(row)
            images.append(image_of(row))
            faces.append(faces_of(row))
        if not todo:
            return rows
        t0 = time.perf_counter()
        try:
            results = self._run(images, styles, faces)
            per_row = [(time.perf_counter() - t0) / len(todo)] * len(todo)
        except Exception:
            log.warning("batch stylization failed; retrying row by row", exc_info=True)
            results, per_row = [], []
            for k, row in enumerate(todo):
                t1 = time.perf_counter()
                try:
                    results.append(self._run([images[k]], [styles[k]], [faces[k]])[0])
                except Exception as exc:
                    _fail(row, "stylize_error", f"{type(exc).__name__}: {exc}")
                    results.append(None)
                per_row.append(time.perf_counter() - t1)
        for row, result, t in zip(todo, results, per_row):
            if result is None:
                continue
            out, plain, in_mosaic, loop = result
            row["out_pixels"] = np.ascontiguousarray(out, dtype=np.uint8).tobytes()
            row["plain_pixels"] = None if plain is None else np.ascontiguousarray(plain, np.uint8).tobytes()
            row["mosaic_faces"] = len(in_mosaic)
            for k, fj in enumerate(face_records(row)):
                fj["in_mosaic"] = k in in_mosaic
                if k in loop:  # the closed loop's choice for this face
                    fj["loop_face_style"], fj["loop_detail"] = loop[k].strength, loop[k].detail
            row["t_stylize"] = t
        return rows


SCORE_COLUMNS = (
    "id_sim_mean",
    "id_sim_min",
    "id_sim_mean_no_mosaic",
    "id_match_rate",
    "n_redetected",
    "colour_distance",
    "colour_distance_source",
    "colour_distance_no_mosaic",
    "style_distance",
    "style_distance_source",
    "style_distance_no_mosaic",
    "content_ssim",
    "t_score",
)


#: ``ScoreStage``'s columns for k generated images a row (``stylid customize``; ``gen_json``: one faces/ row each)
GENERATED_SCORE_COLUMNS = ("n_generated", "n_faces_found", "id_sim_mean", "id_sim_max", "id_match_rate",
                           "clip_score_mean", "gen_json", "t_score")  # fmt: skip


def load_clip(model: str) -> tuple:
    """A local CLIP model folder as (``CLIPModel``, ``CLIPProcessor``), for prompt/image agreement."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(model).eval(), CLIPProcessor.from_pretrained(model)


def clip_score(clip: tuple, images: list[np.ndarray], prompt: str) -> float:
    """CLIP score of ``images`` to ``prompt`` (100 x cosine, clipped at 0, averaged over the images)."""
    import torch

    model, proc = clip
    with torch.no_grad():
        inputs = proc(text=[prompt], images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return float((100 * (img @ txt.T)).clamp_min(0).mean())


#: an output of another size than its source is scored by mapping the source's faces by scale when the aspect ratio
#: is kept to within this fraction (a resize rounds each side to whole pixels); beyond it no mapping is trusted
ASPECT_TOLERANCE = 0.02


class SizeMismatchError(ValueError):
    """An output whose aspect ratio differs from its source's: the source's faces cannot be placed in it by scale."""


def place_faces(faces: list[Face], source_hw: tuple[int, int], output_hw: tuple[int, int]) -> list[Face]:
    """The source's ``faces`` where they lie in an output of ``output_hw`` (height, width) pixels.

    The same faces for the same size (stylization keeps geometry). For a resized output whose aspect ratio is kept
    within ``ASPECT_TOLERANCE``, boxes and keypoints are scaled by ``(w_out / w_src, h_out / h_src)``; the
    embeddings stay the source's. Any other size raises ``SizeMismatchError``: a crop, pad or reframe would put
    the faces elsewhere, and comparing at the wrong place would be silently wrong.
    """
    (sh, sw), (oh, ow) = source_hw[:2], output_hw[:2]
    if (sh, sw) == (oh, ow):
        return faces
    sx, sy = ow / sw, oh / sh
    change = abs(sx / sy - 1.0)
    if change > ASPECT_TOLERANCE:
        raise SizeMismatchError(
            f"output is {ow}x{oh} and its source {sw}x{sh}: the aspect ratio changed by {change:.1%} (more than"
            f" {ASPECT_TOLERANCE:.0%}), so the source's faces cannot be placed in it by scale; give the row a"
            " reference_uri to score it by re-detection instead"
        )
    scale = np.array([sx, sy], dtype=np.float32)
    return [
        Face(box=(f.box[0] * sx, f.box[1] * sy, f.box[2] * sx, f.box[3] * sy),
             keypoints=np.asarray(f.keypoints, np.float32) * scale, score=f.score, embedding=f.embedding)
        for f in faces
    ]  # fmt: skip


def redetect(found: list[Face], reference: Face) -> Face | None:
    """The one re-detection rule, for an output whose pose and framing are new (``stylid score`` of a row with an
    identity reference, each image ``stylid customize`` generates): no face can be placed in it by scale, so the
    reference's face is the largest face detected in it (``found``: the detector's faces in the output), at that
    face's box and keypoints and carrying the ``reference``'s embedding, to be scored by ``identity_scores``. None
    when nothing was detected (then ``id_match`` false, ``redetected`` false, ``id_sim`` null)."""
    if not found:
        return None
    largest = max(found, key=lambda g: g.size_px)
    return Face(box=largest.box, keypoints=largest.keypoints, score=largest.score, embedding=reference.embedding)


def identity_scores(analyzer: FaceAnalyzer, faces: list[Face], image: np.ndarray) -> list[tuple[float, float, bool]]:
    """(``id_sim``, ``id_dist``, ``id_match``) of each of ``faces`` in ``image``: the image embedded at the face's
    keypoints, against the face's own embedding (cosine similarity, the backend's native distance, that distance
    under the backend's threshold). Every job's identity figure (``ScoreStage``, ``stylid customize``)."""
    if not faces:
        return []
    embs = analyzer.embed(image, [f.keypoints for f in faces])
    out = []
    for face, emb in zip(faces, embs):
        dist = float(analyzer.distance(face.embedding, emb))
        out.append((cosine_similarity(face.embedding, emb), dist, bool(dist < analyzer.match_threshold)))
    return out


def resized_like(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``image`` resized to ``source``'s size where it differs (a resized output read back by ``stylid score``), so
    the report's strips cut it where they cut the source; scores use the placed boxes instead."""
    if image.shape[:2] == source.shape[:2]:
        return image
    interp = cv2.INTER_AREA if image.shape[0] > source.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (source.shape[1], source.shape[0]), interpolation=interp)


class ScoreStage(FrameStage):
    """Identity, style and content scores.

    Per face: the output is embedded at the *source* face's keypoints (stylization keeps geometry), and compared
    with the source embedding found upstream: cosine similarity ``id_sim``, the backend's native distance
    ``id_dist``, ``id_match`` when that distance is under the backend's threshold; the same against the
    no-mosaic stylization when it was computed; ``redetected`` when the detector finds a face in the output
    overlapping the source box (IoU >= 0.3); ``photo_detail_fine``/``photo_detail_mid``, how much of the face's own
    detail is the photo's (``photo_detail_correlation``; 1.0 is a copy), for the output and the no-mosaic output.
    Per image: the learned ``style_distance`` (``StyleJudge``) and the Lab ``colour_distance`` of the output (and
    of the source, and of the no-mosaic output) to the style image, and SSIM of the output to the source.

    Outputs that already exist (``stylid score``): an output of another size gets the source's faces mapped by
    scale (``place_faces``; a changed aspect ratio fails the row with ``size_mismatch``), and the face rows' boxes,
    ``size_px`` and ``size_bucket`` are then in the output's pixels, where the face was scored. A row with an
    identity reference (``ref_pixels``: a customization output, whose pose and framing are new) is scored by
    re-detection (``redetect``, the one rule, which ``stylid customize`` scores its generated images by): the
    reference's largest face against the largest face detected in the output; no face found gives ``id_match``
    false, ``redetected`` false and a null ``id_sim``. A chain without a stylize stage has no no-mosaic
    counterfactual: those columns stay null.

    ``generated`` (``stylid customize``: ``gen_pixels``) names a list column of k generated images a row, each
    scored against the reference's face (the row's faces, ``FaceStage``'s, found in ``ref_pixels``) by the same
    re-detection rule: ``GENERATED_SCORE_COLUMNS``, a ``gen_json`` record (faces/ row) per image, and with
    ``clip_model`` the images' CLIP agreement with the row's ``prompt``; no style or source image is read.
    """

    def __init__(
        self,
        faces: FacesConfig,
        score: ScoreConfig,
        io: IOConfig,
        generated: str | None = None,
        clip_model: str | None = None,
    ) -> None:
        _one_thread_for_opencv()
        self.config = score
        self.analyzer = create_face_analyzer(faces)
        self.generated = generated
        if generated is not None:  # k generated images a row against its reference: no style, no source
            self.adds = GENERATED_SCORE_COLUMNS
            self.clip = load_clip(clip_model) if clip_model else None
            return
        self.styles = StyleCache(io)
        self.judge = StyleJudge() if score.style_distance else None
        self.strips = SmallestFaces()  # the faces that get a zoomed strip for the report: the smallest
        self.large_strips = LargestFaces()  # and the largest

    def _score_faces(self, faces: list[Face], image: np.ndarray) -> list[tuple[float, float, bool]]:
        return identity_scores(self.analyzer, faces, image)

    adds = SCORE_COLUMNS

    def rows(self, rows: list[Row]) -> list[Row]:
        self.start(rows)
        for row in rows:
            if row["status"] != "ok":
                continue
            if self.generated is not None and row.get(self.generated) is None:
                continue
            t0 = time.perf_counter()
            try:
                self._score_generated(row) if self.generated is not None else self._score_row(row)
            except SizeMismatchError as exc:
                _fail(row, "size_mismatch", str(exc))
                continue
            except Exception as exc:
                _fail(row, "score_error", f"{type(exc).__name__}: {exc}")
                continue
            row["t_score"] = time.perf_counter() - t0
        return rows

    def _score_generated(self, row: Row) -> None:
        """Scores each of the row's generated images (``self.generated``) against its reference's face (the row's
        largest, ``FaceStage``'s) by the re-detection rule (``redetect``, ``identity_scores``): one ``gen_json``
        record each (its faces/ row), the row's figures over them; an image without a face found is a miss."""
        reference = faces_of(row)[0]
        images = images_of(row, self.generated)
        sims, matches, gens = [], [], []
        for k, img in enumerate(images):
            gen = {"gen_index": k, "detected": False, "id_sim": None, "id_dist": None, "id_match": False}
            placed = redetect(self.analyzer.detect(img), reference)  # a new pose and framing
            if placed is not None:
                ((sim, dist, match),) = identity_scores(self.analyzer, [placed], img)
                gen.update(detected=True, id_sim=sim, id_dist=dist, id_match=match)
                sims.append(sim)
                matches.append(match)
            gens.append({**gen, "backend": self.analyzer.name})
        values = {"gen_json": json.dumps(gens), "n_generated": len(images), "n_faces_found": len(sims),
                  "id_match_rate": float(np.sum(matches)) / len(images) if images else 0.0}  # fmt: skip
        if sims:
            values["id_sim_mean"], values["id_sim_max"] = float(np.mean(sims)), float(np.max(sims))
        if self.clip is not None:
            values["clip_score_mean"] = clip_score(self.clip, images, str(row["prompt"]))
        row.update(values)  # all or nothing

    def _score_row(self, row: Row) -> None:
        """Scores ``row`` into its score columns and its face records; a failure changes nothing."""
        source, out = image_of(row), image_of(row, "out_pixels")
        counterfactual = "plain_pixels" in row  # a chain that stylized (``stylid run``)
        plain = image_of(row, "plain_pixels") if counterfactual and isinstance(row["plain_pixels"], bytes) else None
        faces = faces_of(row)
        from_reference = isinstance(row.get("ref_pixels"), bytes)
        found = self.analyzer.detect(out) if self.config.redetect or from_reference else None
        placed: list[Face | None]
        if from_reference:
            faces = faces[:1]
            placed = [redetect(found, faces[0])]
        else:
            placed = list(place_faces(faces, source.shape, out.shape))
        scored = iter(self._score_faces([p for p in placed if p is not None], out))
        scores = [next(scored) if p is not None else (None, None, False) for p in placed]
        if not counterfactual:
            scores_plain = [(None, None, None)] * len(placed)
        elif plain is not None:
            scores_plain = self._score_faces(placed, plain)
        else:
            scores_plain = scores
        records = []
        for k, (face, where) in enumerate(zip(faces, placed)):
            at = where if where is not None else face
            if from_reference:
                redetected = where is not None
                detail = detail_plain = PhotoDetailCorrelation(None, None)  # another photo: no pixel to pixel
            else:
                redetected = None if found is None else any(box_iou(at.box, g.box) >= 0.3 for g in found)
                detail = photo_detail_correlation(out, source, face.box, at.box)
                detail_plain = (photo_detail_correlation(plain, source, face.box, at.box) if plain is not None
                                else detail if counterfactual else PhotoDetailCorrelation(None, None))  # fmt: skip
            records.append({
                "face_index": k, "x0": at.box[0], "y0": at.box[1], "x1": at.box[2], "y1": at.box[3],
                "det_score": at.score, "size_px": at.size_px, "size_bucket": size_bucket(at.size_px),
                "id_sim": scores[k][0], "id_dist": scores[k][1], "id_match": scores[k][2],
                "id_sim_no_mosaic": scores_plain[k][0], "id_dist_no_mosaic": scores_plain[k][1],
                "id_match_no_mosaic": scores_plain[k][2], "redetected": redetected,
                "photo_detail_fine": detail.fine, "photo_detail_mid": detail.mid,
                "photo_detail_fine_no_mosaic": detail_plain.fine, "photo_detail_mid_no_mosaic": detail_plain.mid,
                "backend": self.analyzer.name, "zoom_strip": None,
            })  # fmt: skip
        sims = [s[0] for s in scores if s[0] is not None]
        plain_sims = [s[0] for s in scores_plain if s[0] is not None]
        style = self.styles.get(row["style_uri"])
        stats = self.styles.statistics(row["style_uri"])
        values = {
            "id_sim_mean": float(np.mean(sims)) if sims else None,
            "id_sim_min": float(np.min(sims)) if sims else None,
            "id_sim_mean_no_mosaic": float(np.mean(plain_sims)) if plain_sims else None,
            "id_match_rate": float(np.mean([bool(s[2]) for s in scores])),
            "n_redetected": None if found is None else int(sum(bool(r["redetected"]) for r in records)),
            "colour_distance": colour_distance(out, style, stats),
            "colour_distance_source": colour_distance(source, style, stats),
            "colour_distance_no_mosaic": colour_distance(plain, style, stats) if plain is not None else None,
            "style_distance": self.judge.distance(out, style) if self.judge else None,
            "style_distance_source": self.judge.distance(source, style) if self.judge else None,
            "style_distance_no_mosaic": (
                self.judge.distance(plain, style) if self.judge and plain is not None else None
            ),  # fmt: skip
            "content_ssim": content_similarity(out, source),
        }
        for rec, face in zip(records, faces):  # last: a row that raised above takes no place among the smallest
            small = self.strips.admit(face.size_px, row["image_id"], rec["face_index"])
            if small or self.large_strips.admit(face.size_px, row["image_id"], rec["face_index"]):
                rec["zoom_strip"] = zoom_strip(face.box, source, plain, resized_like(out, source))
        for rec, fj in zip(records, face_records(row)):  # all or nothing: a row that raised above is unchanged
            rec["in_mosaic"] = None if fj.get("in_mosaic") is None else bool(fj["in_mosaic"])  # null: no stylize stage
            rec["loop_face_style"], rec["loop_detail"] = fj.get("loop_face_style"), fj.get("loop_detail")
            fj["scores"] = rec
        row.update(values)


class FusedCPUStage:
    """A chain's stages in one actor, for CPU-only configurations (``pipelines.chain.build_chain`` with a
    ``Fusion``): the model stages, and with ``fuse_io`` load and write too.

    Three CPU pools of one actor each cannot use more cores than the busiest stage allows; one pool of identical
    actors scales with the cores and moves no pixels between processes. The stages and their per-row error
    handling are the very same classes, given as the chain declares them (``stages``: (class, keyword arguments)
    pairs, in order); each but the last hands the next its rows (``rows``), the last a ``WriteStage``'s table or
    the rows as a table.
    """

    def __init__(
        self,
        stages: list[tuple[type, dict]],
        read_piece: Callable[[dict], pa.Table] | None = None,
        batch_rows: int = 16,
    ) -> None:
        # ``read_piece``: the actor's input batches are pieces of the job's rows, not the rows
        # (``pipelines.plan.PendingRows.pieces_dataset``); it reads each piece's rows with it and runs them in
        # batches of ``batch_rows``, so that the rows never cross Ray's object store
        self.read_piece, self.batch_rows = read_piece, batch_rows
        self.stages: list = [cls(**kwargs) for cls, kwargs in stages]

    def __call__(self, df: pd.DataFrame) -> pa.Table | Iterator[pa.Table]:
        if self.read_piece is None:
            return self.run(df)
        return self._run_pieces(df)

    def _run_pieces(self, pieces: pd.DataFrame) -> Iterator[pa.Table]:
        """Each piece's rows, read here, in batches of ``batch_rows``: the same batches whichever actor reads the
        piece, so that a retried piece hands the shard writers the same batches (their dedup key)."""
        for piece in pieces.to_dict("records"):
            rows = self.read_piece(piece)
            for k in range(0, rows.num_rows, self.batch_rows):
                yield self.run(rows.slice(k, self.batch_rows).to_pandas())

    def run(self, df: pd.DataFrame) -> pa.Table:
        """One batch of rows through every stage."""
        table = to_table(df)  # typed as the job's columns once, then plain Python values
        rows = table.to_pylist()
        for stage in self.stages[:-1]:
            rows = stage.rows(rows)
        last = self.stages[-1]
        if isinstance(last, WriteStage):
            return last.table(rows)
        names = list(dict.fromkeys([*table.column_names, *(a for stage in self.stages for a in stage.adds)]))
        return rows_table(last.rows(rows), names)


class Outputs(NamedTuple):
    """What a job's ``WriteStage`` stores of a row and which tables it hands on: ``pixels``, the image column to
    write (``many``: a list column of k images a row, ``stylid customize``'s ``gen_pixels``, each written as
    ``<key><suffix>-<k>`` and listed as JSON in ``output_uris``; else one image, ``output_uri``); ``metrics``, the
    metrics table's columns; ``faces``, the face rows' columns, taken from the faces' ``scores`` records or, with
    ``face_rows``, from that JSON column of the row (one record a generated image); ``ext``, the images' format
    (None: ``io.image_format``)."""

    pixels: str = "out_pixels"
    many: bool = False
    metrics: tuple[str, ...] = tuple(METRICS_COLUMNS)
    faces: dict[str, pa.DataType] = FACE_COLUMNS
    face_rows: str | None = None
    ext: str | None = None


#: ``stylid run``'s (and ``stylid score``'s) outputs: one image a row, a face row per face
RUN_OUTPUTS = Outputs()


def images_of(row: Any, column: str) -> list[np.ndarray]:
    """The RGB images a row carries in a list column (``gen_pixels``: raw bytes, with their widths and heights in
    the list columns ``PIXEL_SIZE_COLUMNS`` names)."""
    w_col, h_col = PIXEL_SIZE_COLUMNS[column]
    return [np.frombuffer(data, np.uint8).reshape(int(h), int(w), 3)
            for data, w, h in zip(row[column], row[w_col], row[h_col])]  # fmt: skip


class WriteStage:
    """Writes each row's images in one put each through the one key rule (``put_image``), then hands the batch's
    metrics rows, each with its face rows, to the job's shard writers.

    ``outputs`` says what a row writes (``Outputs``; default ``RUN_OUTPUTS``): ``stylid run``'s stylized image as
    ``images/<key><key_suffix>.<ext>`` (at the source's size), or ``stylid customize``'s k generated images as
    ``images/<key><key_suffix>-<k>.png``. The batch's rows are the metrics columns plus ``FACE_ROWS`` (the row's
    face rows, a list of structs of the face columns). In a job they go to its ``shard_writers``
    (``pipelines.shard_writers``), which write them into faces and metrics shards of ``io.rows_per_shard`` rows,
    and the stage returns their ``status`` only; without writers it returns the rows. A row reaches a writer
    only after its images are stored, so the ledger never lists a row whose image is missing.
    With ``write_images`` false (``stylid score``: the images exist already) no image is written and each row
    keeps the ``output_uri`` it came with.
    """

    def __init__(
        self,
        output_uri: str,
        config_hash: str,
        key_suffix: str,
        io: IOConfig,
        write_images: bool = True,
        shard_writers: ShardWriters | None = None,
        outputs: Outputs = RUN_OUTPUTS,
    ) -> None:
        self.output_uri = output_uri
        self.config_hash = config_hash
        self.key_suffix = key_suffix
        self.io = io
        self.write_images = write_images
        self.shard_writers = shard_writers
        self.outputs = outputs
        self.face_rows_type = face_rows_type(self.outputs.faces)

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        return self.table(to_table(df).to_pylist())

    def _write(self, row: Row) -> None:
        """The row's images stored; their URIs in ``output_uri`` (one) or ``output_uris`` (k, as JSON)."""
        out = self.outputs

        def put(suffix: str, image: np.ndarray) -> str:
            return put_image(self.output_uri, row["image_id"], suffix, image, self.io, out.ext)

        if not out.many:
            row["output_uri"] = put(self.key_suffix, at_source_size(row, image_of(row, out.pixels)))
        elif row.get(out.pixels) is not None:
            uris = [put(f"{self.key_suffix}-{k}", image) for k, image in enumerate(images_of(row, out.pixels))]
            row["output_uris"] = json.dumps(uris)

    def _face_rows(self, row: Row) -> list[dict]:
        if row["status"] != "ok":
            return []
        if self.outputs.face_rows is not None:
            records = row.get(self.outputs.face_rows)  # JSON: one record a generated image
            records = json.loads(records) if isinstance(records, str) else []
            return [{"image_id": row["image_id"], **r} for r in records]
        if not row.get("faces_json"):
            return []
        return [{"image_id": row["image_id"], **box_at_source_size(row, fj["scores"])}
                for fj in face_records(row) if "scores" in fj]  # fmt: skip

    def table(self, rows: list[Row]) -> pa.Table:
        """The metrics rows of ``rows`` (written images: ``output_uri``/``output_uris``), each with its face rows
        (``FACE_ROWS``)."""
        keep_uri = not self.write_images
        uri_column = "output_uris" if self.outputs.many else "output_uri"
        face_rows: list[list[dict]] = []
        for row in rows:
            row["config_hash"] = self.config_hash
            row["t_write"] = None
            if not (keep_uri and uri_column in row):
                row[uri_column] = None
            if self.write_images and row["status"] == "ok":
                t0 = time.perf_counter()
                try:
                    self._write(row)
                except Exception as exc:
                    _fail(row, "write_error", f"{type(exc).__name__}: {exc}")
                row["t_write"] = time.perf_counter() - t0
            face_rows.append(self._face_rows(row))
        scrub_errors(rows, self.io)  # error messages never carry a credential
        metrics = to_table_of_rows(rows, list(self.outputs.metrics))  # a chain without a stylize stage lacks some
        kind = self.face_rows_type
        table = metrics.append_column(pa.field(FACE_ROWS, kind), pa.array(face_rows, kind))
        return self.shard_writers.hand_off(table) if self.shard_writers else table


#: the type of ``WriteStage``'s ``FACE_ROWS`` column for ``stylid run``'s outputs
FACE_ROWS_TYPE = face_rows_type(FACE_COLUMNS)


def _source_scale(row: Any) -> tuple[float, float]:
    """(x, y) factors from the working size to the source size of a row (1, 1 when it was worked at full size)."""
    sw, sh = row.get("source_width"), row.get("source_height")
    if sw is None or sh is None or pd.isna(sw) or pd.isna(sh):
        return 1.0, 1.0
    return float(sw) / float(row["width"]), float(sh) / float(row["height"])


def at_source_size(row: Any, image: np.ndarray) -> np.ndarray:
    """``image`` (at the row's working size) resized to the row's source size, for the written output."""
    sx, sy = _source_scale(row)
    if (sx, sy) == (1.0, 1.0):
        return image
    return resize(np.ascontiguousarray(image, dtype=np.uint8), (int(row["source_width"]), int(row["source_height"])))


def box_at_source_size(row: Any, record: dict) -> dict:
    """A per-face record with its box (``x0``..``y1``) in source pixels; ``size_px`` stays the face's size where
    it was detected and scored (the working size), which is what its identity scores depend on."""
    sx, sy = _source_scale(row)
    if (sx, sy) == (1.0, 1.0):
        return record
    return {**record, "x0": record["x0"] * sx, "x1": record["x1"] * sx, "y0": record["y0"] * sy,
            "y1": record["y1"] * sy}  # fmt: skip

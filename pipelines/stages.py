"""Ray Data stages: callable classes for ``Dataset.map_batches``.

Each stage does its heavy set-up once per worker in ``__init__`` (model loads), processes one pandas batch per
``__call__``, and catches bad data per row: a row that fails gets ``status``/``error`` and flows on, untouched by
the stages after it. Rows whose ``status`` is not ``ok`` pass through every stage unchanged. Resources (CPUs,
GPUs, batch size, pool size) come from ``JobConfig.resources`` and are applied in ``pipelines.stylize``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.schema import FACE_COLUMNS, METRICS_COLUMNS, derive_image_id, object_key, to_table
from stylid_core.config import FacesConfig, IOConfig, ScoreConfig, StylizeConfig
from stylid_core.faces import Face, FaceAnalyzer, create_face_analyzer, size_bucket
from stylid_core.faces.base import cosine_similarity
from stylid_core.imageio import ImageDecodeError, decode_image, encode_jpeg, encode_png
from stylid_core.metrics import content_similarity, style_distance
from stylid_core.report import ZOOM_FACE_PX, zoom_strip
from stylid_core.sample_data import default_style_path
from stylid_core.storage import StorageError, join, read_bytes, write_bytes
from stylid_core.stylize import STYLIZERS, Stylizer
from stylid_core.stylize.mosaic import MosaicRestorer

log = logging.getLogger(__name__)

#: concurrent reads of one load batch (fsspec reads wait on I/O, not on the CPU)
READ_THREADS = 8


def _one_thread_for_opencv() -> None:
    """Actors are sized in CPUs by Ray; OpenCV would otherwise start a thread per core in every actor."""
    import cv2

    cv2.setNumThreads(1)


def image_of(row: Any, column: str = "pixels") -> np.ndarray:
    """The RGB image a row carries in ``column`` (raw bytes plus the row's width and height)."""
    return np.frombuffer(row[column], dtype=np.uint8).reshape(int(row["height"]), int(row["width"]), 3)


def _ok(df: pd.DataFrame) -> pd.Series:
    return df["status"] == "ok"


def _fail(df: pd.DataFrame, i: int, status: str, error: str) -> None:
    df.at[i, "status"] = status
    df.at[i, "error"] = error[:2000]


class StyleCache:
    """Style images loaded once per worker and kept (a few distinct styles serve a whole dataset)."""

    def __init__(self, io: IOConfig, capacity: int = 16) -> None:
        self.io = io
        self.capacity = capacity
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, uri: str) -> np.ndarray:
        if uri in self._images:
            self._images.move_to_end(uri)
            return self._images[uri]
        image = decode_image(
            read_bytes(uri, self.io.storage_options, self.io.max_bytes), self.io.max_pixels, self.io.max_bytes
        )
        self._images[uri] = image
        if len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return image


def prepare_rows(df: pd.DataFrame, default_style_uri: str | None) -> pd.DataFrame:
    """Manifest rows with ``image_id`` (a hash of the URI where absent), the effective ``style_uri`` (the row's,
    else the config's, else the bundled style), ``status`` (``missing`` for an empty URI) and ``error``."""
    df = df.copy()
    default_style_uri = default_style_uri or default_style_path()
    for col in ("image_id", "style_uri"):
        if col not in df.columns:
            df[col] = None
    df["image_id"] = [
        str(i) if isinstance(i, str) and i.strip() else derive_image_id(str(u))
        for i, u in zip(df["image_id"], df["image_uri"])
    ]
    df["style_uri"] = [s if isinstance(s, str) and s else default_style_uri for s in df["style_uri"]]
    df["status"] = "ok"
    df["error"] = None
    bad = df["image_uri"].isna() | (df["image_uri"].astype(str).str.strip() == "")
    df.loc[bad, "status"] = "missing"
    df.loc[bad, "error"] = "empty image_uri"
    return df[["image_id", "image_uri", "style_uri", "status", "error"]].reset_index(drop=True)


class LoadStage:
    """Reads each image's bytes through fsspec and decodes it safely to RGB (``stylid_core.imageio``)."""

    def __init__(self, io: IOConfig) -> None:
        self.io = io

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        df = df.copy()
        for col in ("width", "height", "pixels", "t_load"):
            df[col] = None
        rows = list(df.index[_ok(df)])
        reads = self._read_all([df.at[i, "image_uri"] for i in rows])
        for i, (data, read_s) in zip(rows, reads):
            t0 = time.perf_counter() - read_s
            try:
                if isinstance(data, Exception):
                    raise data
                image = decode_image(data, self.io.max_pixels, self.io.max_bytes)
            except (StorageError, ImageDecodeError) as exc:
                _fail(df, i, exc.status, str(exc))
                continue
            except Exception as exc:  # anything else is still this row's problem only
                _fail(df, i, "load_error", f"{type(exc).__name__}: {exc}")
                continue
            df.at[i, "height"], df.at[i, "width"] = image.shape[:2]
            df.at[i, "pixels"] = image.tobytes()
            df.at[i, "t_load"] = time.perf_counter() - t0
        return to_table(df)

    def _read_all(self, uris: list[str]) -> list[tuple[bytes | Exception, float]]:
        """Each URI's bytes (or the exception reading it raised) and seconds taken, read concurrently: on an object
        store a batch then waits about one request's latency instead of one per row."""

        def read(uri: str) -> tuple[bytes | Exception, float]:
            t0 = time.perf_counter()
            try:
                return read_bytes(uri, self.io.storage_options, self.io.max_bytes), time.perf_counter() - t0
            except Exception as exc:  # raised again for its row, which fails alone
                return exc, time.perf_counter() - t0

        if len(uris) <= 1:
            return [read(u) for u in uris]
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(uris))) as pool:
            return list(pool.map(read, uris))


class FaceStage:
    """Detects faces, places keypoints and embeds them with the configured ``FaceAnalyzer`` (CPU actors)."""

    def __init__(self, faces: FacesConfig) -> None:
        _one_thread_for_opencv()
        self.config = faces
        self.analyzer: FaceAnalyzer = create_face_analyzer(faces)

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        df = df.copy()
        for col in ("n_faces", "n_faces_detected", "faces_json", "t_faces"):
            df[col] = None
        for i in df.index[_ok(df)]:
            t0 = time.perf_counter()
            try:
                image = image_of(df.loc[i])
                detected = self.analyzer.detect(image)
                detected.sort(key=lambda f: -f.size_px)
                faces = detected[: self.config.max_faces]
                if faces:
                    for face, emb in zip(faces, self.analyzer.embed(image, [f.keypoints for f in faces])):
                        face.embedding = emb
            except Exception as exc:
                _fail(df, i, "face_error", f"{type(exc).__name__}: {exc}")
                continue
            df.at[i, "n_faces_detected"] = len(detected)
            df.at[i, "n_faces"] = len(faces)
            df.at[i, "faces_json"] = json.dumps([f.to_dict() for f in faces])
            df.at[i, "t_faces"] = time.perf_counter() - t0
            if not faces:
                _fail(df, i, "no_face", "no face detected")
        return to_table(df)


def faces_of(row: Any) -> list[Face]:
    return [Face.from_dict(d) for d in json.loads(row["faces_json"] or "[]")]


class StylizeStage:
    """Stylizes each image after its style with the configured engine, wrapped in the ``MosaicRestorer``.

    The engine is built once per actor; a batch goes to the engine in one ``stylize_batch`` call (one UNet batch
    for the diffusion engine). If that call fails, the rows are retried one by one so only the bad row fails.
    """

    def __init__(self, stylize: StylizeConfig, score: ScoreConfig, io: IOConfig) -> None:
        _one_thread_for_opencv()
        self.config = stylize
        self.compare = score.compare_without_mosaic
        self.stylizer: Stylizer = STYLIZERS.create(stylize.engine, **stylize.options)
        self.restorer = MosaicRestorer(self.stylizer, stylize.mosaic) if stylize.mosaic.enabled else None
        self.styles = StyleCache(io)

    def _run(self, images, styles, faces) -> list[tuple[np.ndarray, np.ndarray | None, set[int]]]:
        """(output, output without mosaic or None, indices of the faces that went into the mosaic) per image."""
        if self.restorer is None:
            outs = self.stylizer.stylize_batch(images, styles, faces)
            return [(o, None, set()) for o in outs]
        tiles = [self.restorer.plan(im.shape[1], im.shape[0], fs).face_indices for im, fs in zip(images, faces)]
        outs = self.restorer.stylize_batch(images, styles, faces)
        plains: list[np.ndarray | None] = [None] * len(images)
        if self.compare:
            need = [k for k, t in enumerate(tiles) if t]
            if need:
                done = self.stylizer.stylize_batch(
                    [images[k] for k in need], [styles[k] for k in need], [faces[k] for k in need]
                )
                for k, out in zip(need, done):
                    plains[k] = out
        return list(zip(outs, plains, tiles))

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        df = df.copy()
        for col in ("out_pixels", "plain_pixels", "mosaic_faces", "t_stylize"):
            df[col] = None
        df["engine"] = self.stylizer.name
        df["model"] = self.stylizer.model
        rows, images, styles, faces = [], [], [], []
        for i in df.index[_ok(df)]:
            try:
                styles.append(self.styles.get(df.at[i, "style_uri"]))
            except (StorageError, ImageDecodeError) as exc:
                _fail(df, i, "style_error", f"style image {df.at[i, 'style_uri']}: {exc}")
                continue
            rows.append(i)
            images.append(image_of(df.loc[i]))
            faces.append(faces_of(df.loc[i]))
        if not rows:
            return to_table(df)
        t0 = time.perf_counter()
        try:
            results = self._run(images, styles, faces)
            per_row = [(time.perf_counter() - t0) / len(rows)] * len(rows)
        except Exception:
            log.warning("batch stylization failed; retrying row by row", exc_info=True)
            results, per_row = [], []
            for k, i in enumerate(rows):
                t1 = time.perf_counter()
                try:
                    results.append(self._run([images[k]], [styles[k]], [faces[k]])[0])
                except Exception as exc:
                    _fail(df, i, "stylize_error", f"{type(exc).__name__}: {exc}")
                    results.append(None)
                per_row.append(time.perf_counter() - t1)
        for i, result, t in zip(rows, results, per_row):
            if result is None:
                continue
            out, plain, in_mosaic = result
            df.at[i, "out_pixels"] = np.ascontiguousarray(out, dtype=np.uint8).tobytes()
            df.at[i, "plain_pixels"] = None if plain is None else np.ascontiguousarray(plain, np.uint8).tobytes()
            df.at[i, "mosaic_faces"] = len(in_mosaic)
            face_json = json.loads(df.at[i, "faces_json"])
            for k, fj in enumerate(face_json):
                fj["in_mosaic"] = k in in_mosaic
            df.at[i, "faces_json"] = json.dumps(face_json)
            df.at[i, "t_stylize"] = t
        return to_table(df)


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


SCORE_COLUMNS = (
    "id_sim_mean",
    "id_sim_min",
    "id_sim_mean_no_mosaic",
    "id_match_rate",
    "n_redetected",
    "style_distance",
    "style_distance_source",
    "style_distance_no_mosaic",
    "content_ssim",
    "t_score",
)


class ScoreStage:
    """Identity, style and content scores.

    Per face: the output is embedded at the *source* face's keypoints (stylization keeps geometry), and compared
    with the source embedding found upstream: cosine similarity ``id_sim``, the backend's native distance
    ``id_dist``, ``id_match`` when that distance is under the backend's threshold; the same against the
    no-mosaic stylization when it was computed; ``redetected`` when the detector finds a face in the output
    overlapping the source box (IoU >= 0.3). Per image: colour-statistics style distance of the output (and of
    the source, and of the no-mosaic output) to the style image, and SSIM of the output to the source.
    """

    def __init__(self, faces: FacesConfig, score: ScoreConfig, io: IOConfig) -> None:
        _one_thread_for_opencv()
        self.config = score
        self.analyzer = create_face_analyzer(faces)
        self.styles = StyleCache(io)
        self.face_rows: list[dict] = []

    def _score_faces(self, faces: list[Face], image: np.ndarray) -> list[tuple[float, float, bool]]:
        embs = self.analyzer.embed(image, [f.keypoints for f in faces])
        out = []
        for face, emb in zip(faces, embs):
            dist = self.analyzer.distance(face.embedding, emb)
            out.append((cosine_similarity(face.embedding, emb), dist, dist < self.analyzer.match_threshold))
        return out

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        df = df.copy()
        for col in SCORE_COLUMNS:
            df[col] = None
        for i in df.index[_ok(df)]:
            t0 = time.perf_counter()
            try:
                self._score_row(df, i)
            except Exception as exc:
                _fail(df, i, "score_error", f"{type(exc).__name__}: {exc}")
                continue
            df.at[i, "t_score"] = time.perf_counter() - t0
        return to_table(df)

    def _score_row(self, df: pd.DataFrame, i: int) -> None:
        row = df.loc[i]
        source, out = image_of(row), image_of(row, "out_pixels")
        plain = image_of(row, "plain_pixels") if isinstance(row["plain_pixels"], bytes) else None
        faces = faces_of(row)
        scores = self._score_faces(faces, out)
        scores_plain = self._score_faces(faces, plain) if plain is not None else scores
        found = self.analyzer.detect(out) if self.config.redetect else None
        records = []
        for k, face in enumerate(faces):
            redetected = None if found is None else any(_iou(face.box, g.box) >= 0.3 for g in found)
            records.append({
                "face_index": k, "x0": face.box[0], "y0": face.box[1], "x1": face.box[2], "y1": face.box[3],
                "det_score": face.score, "size_px": face.size_px, "size_bucket": size_bucket(face.size_px),
                "id_sim": scores[k][0], "id_dist": scores[k][1], "id_match": scores[k][2],
                "id_sim_no_mosaic": scores_plain[k][0], "id_dist_no_mosaic": scores_plain[k][1],
                "id_match_no_mosaic": scores_plain[k][2], "redetected": redetected, "backend": self.analyzer.name,
                "zoom_strip": zoom_strip(face.box, source, plain, out) if face.size_px < ZOOM_FACE_PX else None,
            })  # fmt: skip
        sims = [s[0] for s in scores]
        df.at[i, "id_sim_mean"] = float(np.mean(sims))
        df.at[i, "id_sim_min"] = float(np.min(sims))
        df.at[i, "id_sim_mean_no_mosaic"] = float(np.mean([s[0] for s in scores_plain]))
        df.at[i, "id_match_rate"] = float(np.mean([s[2] for s in scores]))
        df.at[i, "n_redetected"] = None if found is None else int(sum(bool(r["redetected"]) for r in records))
        style = self.styles.get(row["style_uri"])
        df.at[i, "style_distance"] = style_distance(out, style)
        df.at[i, "style_distance_source"] = style_distance(source, style)
        df.at[i, "style_distance_no_mosaic"] = style_distance(plain, style) if plain is not None else None
        df.at[i, "content_ssim"] = content_similarity(out, source)
        face_json = json.loads(row["faces_json"])
        for rec, fj in zip(records, face_json):
            rec["in_mosaic"] = bool(fj.get("in_mosaic", False))
            fj["scores"] = rec
        df.at[i, "faces_json"] = json.dumps(face_json)


class FusedCPUStage:
    """Faces, stylize and score (and, with ``write``, load and write too) in one actor, for CPU-only configurations.

    Three CPU pools of one actor each cannot use more cores than the busiest stage allows; one pool of identical
    actors scales with the cores and moves no pixels between processes. The stages and their per-row error
    handling are the very same classes.
    """

    def __init__(
        self, faces: FacesConfig, stylize: StylizeConfig, score: ScoreConfig, io: IOConfig, write: dict | None = None
    ) -> None:
        self.stages: list = [FaceStage(faces), StylizeStage(stylize, score, io), ScoreStage(faces, score, io)]
        if write is not None:
            # ``resources.fuse_io``: load before and write after, in this actor (``write``: ``WriteStage``'s
            # keyword arguments); the batch then never crosses the object store with its pixels
            self.stages = [LoadStage(io), *self.stages, WriteStage(io=io, **write)]

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        table = to_table(df)
        for stage in self.stages:
            table = stage(table.to_pandas())
        return table


class WriteStage:
    """Writes stylized images and the metrics of the batch, each object in one put.

    Images go to ``images/<key>.<ext>``; the batch's per-face rows to ``faces/part-<h>.parquet`` and its per-image
    rows to ``metrics/part-<h>.parquet``, ``h`` a hash of the batch's ids. The metrics shard is written last: it
    is the resume ledger, so a row counts as done only once its image and face rows are stored.
    """

    def __init__(self, output_uri: str, config_hash: str, key_suffix: str, io: IOConfig) -> None:
        self.output_uri = output_uri
        self.config_hash = config_hash
        self.key_suffix = key_suffix
        self.io = io

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        df = df.copy()
        df["output_uri"] = None
        df["t_write"] = None
        df["config_hash"] = self.config_hash
        face_rows = []
        for i in df.index:
            if df.at[i, "status"] == "ok":
                t0 = time.perf_counter()
                try:
                    out = image_of(df.loc[i], "out_pixels")
                    ext = self.io.image_format
                    data = encode_png(out) if ext == "png" else encode_jpeg(out, 92)
                    name = f"{object_key(df.at[i, 'image_id'])}{self.key_suffix}.{ext}"
                    uri = join(self.output_uri, "images", name)
                    write_bytes(uri, data, self.io.storage_options)
                    df.at[i, "output_uri"] = uri
                except Exception as exc:
                    _fail(df, i, "write_error", f"{type(exc).__name__}: {exc}")
                df.at[i, "t_write"] = time.perf_counter() - t0
            if isinstance(df.at[i, "faces_json"], str) and df.at[i, "status"] == "ok":
                for fj in json.loads(df.at[i, "faces_json"]):
                    if "scores" in fj:
                        face_rows.append({"image_id": df.at[i, "image_id"], **fj["scores"]})
        faces_df = pd.DataFrame(face_rows, columns=list(FACE_COLUMNS))
        metrics = to_table(df[METRICS_COLUMNS])
        write_shards(self.output_uri, df["image_id"], to_table(faces_df, FACE_COLUMNS), metrics,
                     self.io.storage_options)  # fmt: skip
        return metrics


def shard_name(image_ids) -> str:
    """``part-<h>.parquet``, ``h`` a hash of the batch's ids (the same batch always gets the same name)."""
    digest = hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]
    return f"part-{digest}.parquet"


def write_shards(output_uri: str, image_ids, faces: pa.Table, metrics: pa.Table, storage_options: dict) -> None:
    """A batch's ``faces/`` shard, then its ``metrics/`` shard (the resume ledger: written last), one put each."""
    name = shard_name(image_ids)
    write_bytes(join(output_uri, "faces", name), parquet_bytes(faces), storage_options)
    write_bytes(join(output_uri, "metrics", name), parquet_bytes(metrics), storage_options)


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()

"""The one record that flows through every stage, as Arrow types.

A stage adds columns and never drops a row; every stage's output is typed from this table, so batches whose
values happen to be all null still concatenate with the others.
"""

from __future__ import annotations

import hashlib
import re

import pandas as pd
import pyarrow as pa

COLUMNS: dict[str, pa.DataType] = {
    # manifest
    "image_id": pa.string(),
    "image_uri": pa.string(),
    "style_uri": pa.string(),
    "reference_uri": pa.string(),  # stylid score: the identity reference of a customization output
    # every stage
    "status": pa.string(),
    "error": pa.string(),
    # load
    "width": pa.int32(),  # the working size (``io.max_work_pixels``): what faces, stylize and score see
    "height": pa.int32(),
    "source_width": pa.int32(),  # the image's own size (after EXIF rotation): the written output's
    "source_height": pa.int32(),
    "pixels": pa.binary(),  # raw RGB uint8, height*width*3 bytes
    # stylid score: the output read back (null: the stylized pixels, of the source's size) and the reference
    "out_width": pa.int32(),
    "out_height": pa.int32(),
    "ref_width": pa.int32(),
    "ref_height": pa.int32(),
    "ref_pixels": pa.binary(),
    # faces
    "n_faces": pa.int32(),
    "n_faces_detected": pa.int32(),  # before the max_faces cap
    "faces_json": pa.string(),
    # stylize
    "out_pixels": pa.binary(),
    "plain_pixels": pa.binary(),  # stylized without mosaic, when compared
    "engine": pa.string(),
    "model": pa.string(),
    "mosaic_faces": pa.int32(),
    # score
    "id_sim_mean": pa.float64(),
    "id_sim_min": pa.float64(),
    "id_sim_mean_no_mosaic": pa.float64(),
    "id_match_rate": pa.float64(),
    "n_redetected": pa.int32(),
    "colour_distance": pa.float64(),
    "colour_distance_source": pa.float64(),
    "colour_distance_no_mosaic": pa.float64(),
    "style_distance": pa.float64(),  # learned (stylid_core.style_judge); the Lab figure is colour_distance
    "style_distance_source": pa.float64(),
    "style_distance_no_mosaic": pa.float64(),
    "content_ssim": pa.float64(),
    # write
    "output_uri": pa.string(),
    "config_hash": pa.string(),
    # timings (seconds)
    "t_load": pa.float64(),
    "t_faces": pa.float64(),
    "t_stylize": pa.float64(),
    "t_score": pa.float64(),
    "t_write": pa.float64(),
}

#: the per-image metrics table: everything but pixels and the per-face JSON
METRICS_COLUMNS = [c for c in COLUMNS if c not in ("pixels", "out_pixels", "plain_pixels", "ref_pixels", "faces_json")]

FACE_COLUMNS: dict[str, pa.DataType] = {
    "image_id": pa.string(),
    "face_index": pa.int32(),
    "x0": pa.float64(),
    "y0": pa.float64(),
    "x1": pa.float64(),
    "y1": pa.float64(),
    "det_score": pa.float64(),
    "size_px": pa.float64(),
    "size_bucket": pa.string(),
    "in_mosaic": pa.bool_(),
    # the mosaic's per-face closed loop (stylize.mosaic.identity_loop): the face style strength and the photo-detail
    # amount of the rendering it chose for this face; null where the loop did not run on the face
    "loop_face_style": pa.float64(),
    "loop_detail": pa.float64(),
    "id_sim": pa.float64(),
    "id_dist": pa.float64(),
    "id_match": pa.bool_(),
    "id_sim_no_mosaic": pa.float64(),
    "id_dist_no_mosaic": pa.float64(),
    "id_match_no_mosaic": pa.bool_(),
    "redetected": pa.bool_(),
    # how much of the face's own detail is the photo's (stylid_core.metrics.photo_detail_correlation): 1.0 is a
    # copy; null for a constant patch and for faces scored against a reference (another photo, another pose)
    "photo_detail_fine": pa.float64(),
    "photo_detail_mid": pa.float64(),
    "photo_detail_fine_no_mosaic": pa.float64(),
    "photo_detail_mid_no_mosaic": pa.float64(),
    "backend": pa.string(),
    # base64 JPEG of source / no mosaic / mosaic, for the faces that may be among the report's smallest
    # (report.SmallestFaces: under report.ZOOM_FACE_PX, a few hundred per million faces); else null
    "zoom_strip": pa.string(),
}


#: ``stylid customize``'s rows between its stages (``pipelines.customize``): the shared columns and its own. Images
#: cross the stages as raw RGB bytes with their sizes, as every job's do (never re-encoded between stages)
CUSTOMIZE_COLUMNS: dict[str, pa.DataType] = {
    **COLUMNS,
    "prompt": pa.string(),
    "pose_uri": pa.string(),
    "num_images": pa.int32(),
    "backend": pa.string(),
    "pose_pixels": pa.binary(),
    "pose_width": pa.int32(),
    "pose_height": pa.int32(),
    "gen_pixels": pa.list_(pa.binary()),  # the generated images, raw RGB
    "gen_width": pa.list_(pa.int32()),
    "gen_height": pa.list_(pa.int32()),
    "gen_json": pa.string(),  # one record per generated image: its faces/ row
    "n_generated": pa.int32(),
    "n_faces_found": pa.int32(),
    "id_sim_max": pa.float64(),
    "clip_score_mean": pa.float64(),
    "output_uris": pa.string(),  # JSON list
    "t_generate": pa.float64(),
}

#: the type of every column of any job's record (``COLUMNS`` and ``stylid customize``'s own): how a column is typed
#: where a stage names no table of its own, so the shared stages type a customize row's ``num_images`` too
RECORD_COLUMNS = CUSTOMIZE_COLUMNS

#: ``stylid customize``'s metrics table (its ledger, as ``METRICS_COLUMNS`` is ``stylid run``'s)
CUSTOMIZE_METRICS_COLUMNS = [
    "image_id", "reference_uri", "pose_uri", "prompt", "num_images", "status", "error", "backend", "model",
    "n_generated", "n_faces_found", "id_sim_mean", "id_sim_max", "id_match_rate", "clip_score_mean", "output_uris",
    "t_load", "t_faces", "t_generate", "t_score", "t_write", "config_hash",
]  # fmt: skip

#: ``stylid customize``'s faces table: one row per generated image, its (largest) face against the reference's
CUSTOMIZE_FACE_COLUMNS: dict[str, pa.DataType] = {
    "image_id": pa.string(),
    "gen_index": pa.int32(),  # k of images/<key>-<hash>-<k>.png
    "detected": pa.bool_(),  # a face was found (and embedded) in the generated image
    "id_sim": pa.float64(),  # cosine similarity to the reference embedding; null when not detected
    "id_dist": pa.float64(),  # the face backend's native distance
    "id_match": pa.bool_(),  # id_dist under the backend's threshold (false when not detected)
    "backend": pa.string(),  # the face backend that scored it
}


def face_rows_type(columns: dict[str, pa.DataType]) -> pa.DataType:
    """The type of a write stage's ``FACE_ROWS`` column: a list of a job's face rows (``columns`` as a struct)."""
    return pa.list_(pa.struct([pa.field(k, v) for k, v in columns.items()]))


def to_table(df: pd.DataFrame, columns: dict[str, pa.DataType] | None = None) -> pa.Table:
    """``df`` as an Arrow table with every known column typed from ``columns`` (default: ``RECORD_COLUMNS``)."""
    columns = columns or RECORD_COLUMNS
    fields = [pa.field(name, columns.get(name, pa.string())) for name in df.columns]
    arrays = []
    for field in fields:
        values = df[field.name].tolist()
        values = [None if _is_missing(v) else v for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def to_table_of_rows(rows: list[dict], names: list[str], columns: dict[str, pa.DataType] | None = None) -> pa.Table:
    """``rows`` (dicts of plain Python values) as an Arrow table of the columns ``names``, typed from ``columns``
    (default: ``RECORD_COLUMNS``); a value a row lacks is null."""
    columns = columns or RECORD_COLUMNS
    fields = [pa.field(name, columns.get(name, pa.string())) for name in names]
    arrays = []
    for field in fields:
        values = [row.get(field.name) for row in rows]
        arrays.append(pa.array([None if _is_missing(v) else v for v in values], type=field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _is_missing(v: object) -> bool:
    try:
        return v is None or (isinstance(v, float) and v != v) or v is pd.NA or v is pd.NaT
    except TypeError:
        return False


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def derive_image_id(uri: str) -> str:
    """A stable id for a row without one: 16 hex digits of the URI's SHA-256."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


#: the tail of a hashed key: ``-`` and 16 hex digits of the raw id's SHA-256
_HASHED_TAIL = re.compile(r"-[0-9a-f]{16}$")


def object_key(image_id: str) -> str:
    """A storage-safe file stem for ``image_id``: itself when safe, else a cleaned form plus 16 hex digits of the
    raw id's SHA-256. Distinct ids get distinct keys: a safe id that ends the way a hashed key does (``-`` and 16
    hex digits) is hashed too, so a kept id is never the key of another id, and hashed keys differ by their hash
    (two ids share one only on a 64-bit hash collision with the same cleaned prefix)."""
    safe = _SAFE.search(image_id) is None and image_id not in (".", "..") and len(image_id) <= 128
    if safe and _HASHED_TAIL.search(image_id) is None:
        return image_id
    cleaned = _SAFE.sub("_", image_id)[:96].strip("._") or "id"
    return f"{cleaned}-{hashlib.sha256(image_id.encode()).hexdigest()[:16]}"

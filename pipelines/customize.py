"""``stylid customize`` on Ray Data: reference rows -> faces -> portraits (GPU actor pool) -> scores -> outputs.

Manifest columns: ``reference_uri``, ``prompt``, optional ``image_id``, ``pose_uri``, ``num_images``. Every row
comes out once in the ``metrics/part-<h>.parquet`` shards with ``status`` (``ok`` or a reason) and ``error``;
generated images go to ``<output>/images/<image_id>-<hash>-<k>.png`` (one put each) and one row per generated
image to ``faces/part-<h>.parquet``. The shards and the resume ledger are ``stylid run``'s (``stylid_core.ledger``):
a rerun processes only the ids not yet in ``metrics/`` and, with none left, starts no stage.
``run.json`` and ``_SUCCESS`` are written by ``jobs.customize``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from pipelines.chain import StageSpec, build_chain, check_chain_fits
from pipelines.manifest import MANIFEST_BATCH_ROWS, ManifestReader, check_unique_ids
from pipelines.plan import PendingRows, input_block_rows
from pipelines.runner import RunResult, process_pending
from pipelines.schema import object_key
from stylid_core.config import StageResources
from stylid_core.customize.base import CUSTOMIZERS
from stylid_core.customize.job_config import CustomizeJobConfig
from stylid_core.faces.base import Face
from stylid_core.faces.factory import create_face_analyzer
from stylid_core.imageio import ImageDecodeError, decode_image, encode_png
from stylid_core.ledger import FACE_ROWS
from stylid_core.metrics import identity_similarity
from stylid_core.storage import StorageError, join, read_bytes, write_bytes

if TYPE_CHECKING:
    from pipelines.shard_writers import ShardWriters

log = logging.getLogger(__name__)

#: per-row metrics columns and their pandas dtypes (fixed so all-null batches still concatenate)
METRIC_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "reference_uri": "string",
    "pose_uri": "string",
    "prompt": "string",
    "num_images": "Int32",
    "status": "string",
    "error": "string",
    "backend": "string",
    "model": "string",
    "n_generated": "Int32",
    "n_faces_found": "Int32",
    "id_sim_mean": "Float64",
    "id_sim_max": "Float64",
    "id_match_rate": "Float64",
    "clip_score_mean": "Float64",
    "output_uris": "string",  # JSON list
    "t_reference": "Float64",
    "t_generate": "Float64",
    "t_score": "Float64",
    "config_hash": "string",
}

#: one row per generated image: identity of its (largest) face against the reference face
FACE_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "gen_index": "Int32",  # k of images/<image_id>-<hash>-<k>.png
    "detected": "boolean",  # a face was found (and embedded) in the generated image
    "id_sim": "Float64",  # cosine similarity to the reference embedding; null when not detected
    "id_dist": "Float64",  # the face backend's native distance
    "id_match": "boolean",  # id_dist under the backend's threshold (false when not detected)
    "backend": "string",  # the face backend that scored it
}

#: manifest columns read on the driver (the rest of a manifest stays on storage)
MANIFEST_COLUMNS = ("image_id", "reference_uri", "prompt", "pose_uri", "num_images")


def _decode_png(data: bytes) -> np.ndarray:
    return decode_image(bytes(data))


def _read_image(uri: str, config: CustomizeJobConfig) -> np.ndarray:
    """The RGB image at ``uri`` (transient storage failures retried); ``ImageDecodeError`` with the row status and
    the URI for anything that cannot be used."""
    try:
        data = read_bytes(uri, config.io.storage_options, config.io.max_bytes, config.io.retry)
    except StorageError as exc:
        raise ImageDecodeError(exc.status, str(exc)) from None
    return decode_image(data, max_pixels=config.io.max_pixels, max_bytes=config.io.max_bytes, source=uri)


def _fail(df: pd.DataFrame, i: int, status: str, error: str) -> None:
    df.at[i, "status"] = status
    df.at[i, "error"] = error[:2000]


class PrepareCustomizeRows:
    """Manifest rows -> the record: ``image_id`` derived when absent, defaults filled, ``status`` (``missing`` for
    an empty ``reference_uri``), ``error`` and ``backend``. Runs on the driver (a few small columns a row)."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.reset_index(drop=True).copy()
        for col in ("image_id", "pose_uri", "num_images", "prompt"):
            if col not in df:
                df[col] = None
        df["image_id"] = [
            str(i) if isinstance(i, str) and i else hashlib.sha256(f"{u}|{p}".encode()).hexdigest()[:16]
            for i, u, p in zip(df["image_id"], df["reference_uri"], df["prompt"])
        ]
        n = pd.to_numeric(df["num_images"], errors="coerce").fillna(self.config.default_num_images).astype(int)
        df["num_images"] = n.clip(1, self.config.max_num_images)
        df["prompt"] = df["prompt"].fillna("").astype(str)
        df["pose_uri"] = [p if isinstance(p, str) and p else None for p in df["pose_uri"]]
        df["status"] = "ok"
        df["error"] = None
        bad = df["reference_uri"].isna() | (df["reference_uri"].astype(str).str.strip() == "")
        df.loc[bad, "status"] = "missing"
        df.loc[bad, "error"] = "empty reference_uri"
        df["backend"] = self.config.backend
        return df[[*MANIFEST_COLUMNS, "status", "error", "backend"]]


#: how ``stylid customize`` derives a missing id (named in the duplicate-ids error)
CUSTOMIZE_ID_HINT = "rows without one get a hash of reference_uri and prompt"


def iter_customize_manifest(
    manifest_uri: str, config: CustomizeJobConfig, batch_rows: int = MANIFEST_BATCH_ROWS
) -> ManifestReader:
    """The customize manifest streamed as ``stylid run``'s is (``ManifestReader``: pyarrow batches of
    ``batch_rows``, each prepared by ``PrepareCustomizeRows``), for ``process_pending``: the driver holds the ids
    and the pending rows, never the whole manifest in pandas. ``ValueError`` for a missing manifest or no
    ``reference_uri`` column at construction, for duplicate ids when the plan reads the ids."""
    prepare = PrepareCustomizeRows(config)

    def prepared(table: pa.Table) -> pa.Table:
        return pa.Table.from_pandas(prepare(table.to_pandas()), preserve_index=False)

    return ManifestReader(
        manifest_uri, None, config.io.storage_options, batch_rows, required="reference_uri",
        columns=MANIFEST_COLUMNS, id_columns=("image_id", "reference_uri", "prompt"), prepare=prepared,
        id_hint=CUSTOMIZE_ID_HINT,
    )  # fmt: skip


def read_customize_manifest(manifest_uri: str, config: CustomizeJobConfig) -> pd.DataFrame:
    """The whole prepared manifest (``iter_customize_manifest``'s batches) as one frame; ``stylid customize``
    streams them into ``process_pending`` instead. Raises ``ValueError`` for a missing manifest, no
    ``reference_uri`` column or duplicate ids."""
    reader = iter_customize_manifest(manifest_uri, config)
    parts = list(reader)
    if not parts:
        empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in MANIFEST_COLUMNS})
        return PrepareCustomizeRows(config)(empty)
    df = pa.concat_tables(parts, promote_options="permissive").to_pandas()
    check_unique_ids(df, manifest_uri, CUSTOMIZE_ID_HINT)
    return df


class ReferenceStage:
    """CPU stage: load the reference (and pose) image, find the largest face, embed it."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.analyzer = create_face_analyzer(config.faces)

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.reset_index(drop=True).copy()
        for col in ("model", "output_uris", "ref_png", "pose_png", "face_json", "out_pngs"):
            df[col] = None
        t = []
        for i in range(len(df)):
            t0 = time.perf_counter()
            if df.at[i, "status"] != "ok":
                t.append(None)
                continue
            try:
                image = _read_image(str(df.at[i, "reference_uri"]), self.config)
                faces = self.analyzer.analyze(image, max_faces=1)
                if not faces:
                    _fail(df, i, "no_face", "no face in the reference image")
                else:
                    face = faces[0]
                    d = face.to_dict()
                    if face.landmarks is not None:
                        d["landmarks"] = np.asarray(face.landmarks, float).tolist()
                    df.at[i, "face_json"] = json.dumps(d)
                    df.at[i, "ref_png"] = encode_png(image)
                pose = df.at[i, "pose_uri"]
                if isinstance(pose, str) and pose and df.at[i, "status"] == "ok":
                    df.at[i, "pose_png"] = encode_png(_read_image(pose, self.config))
            except ImageDecodeError as exc:
                _fail(df, i, exc.status, str(exc))
            except Exception as exc:  # a bad row is an error row, never a crashed job
                _fail(df, i, "reference_error", f"{type(exc).__name__}: {exc}")
            t.append(time.perf_counter() - t0)
        df["t_reference"] = t
        return df


class CustomizeStage:
    """GPU actor stage: the configured ``Customizer`` generates ``num_images`` portraits per ok row."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.customizer = CUSTOMIZERS.create(config.backend, config=dict(config.options))

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        times = []
        for i in range(len(df)):
            t0 = time.perf_counter()
            df.at[i, "model"] = self.customizer.model
            if df.at[i, "status"] == "ok":
                try:
                    face_d = json.loads(df.at[i, "face_json"])
                    face = Face.from_dict(face_d)
                    if face_d.get("landmarks") is not None:
                        face.landmarks = np.asarray(face_d["landmarks"], np.float32)
                    pose = df.at[i, "pose_png"]
                    pose = pose if isinstance(pose, (bytes, bytearray, memoryview)) else None  # null: no pose
                    images = self.customizer.generate(
                        _decode_png(df.at[i, "ref_png"]), face, str(df.at[i, "prompt"]),
                        num_images=int(df.at[i, "num_images"]),
                        pose=None if pose is None else _decode_png(pose),
                        seed=int(hashlib.sha256(str(df.at[i, "image_id"]).encode()).hexdigest()[:8], 16),
                    )  # fmt: skip
                    df.at[i, "out_pngs"] = [encode_png(img) for img in images]
                except Exception as exc:
                    _fail(df, i, "generate_error", f"{type(exc).__name__}: {exc}")
            times.append(time.perf_counter() - t0)
        df["t_generate"] = times
        return df


class CustomizeScoreStage:
    """Identity similarity of each generated face to the reference (and CLIP prompt agreement when configured)."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.analyzer = create_face_analyzer(config.faces)
        self.clip = None
        if config.clip_model:
            from transformers import CLIPModel, CLIPProcessor

            self.clip = (CLIPModel.from_pretrained(config.clip_model).eval(),
                         CLIPProcessor.from_pretrained(config.clip_model))  # fmt: skip

    def _clip_score(self, images: list[np.ndarray], prompt: str) -> float:
        import torch

        model, proc = self.clip
        with torch.no_grad():
            inputs = proc(text=[prompt], images=images, return_tensors="pt", padding=True)
            out = model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return float((100 * (img @ txt.T)).clamp_min(0).mean())

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        cols = {c: [None] * len(df) for c in ("n_generated", "n_faces_found", "id_sim_mean", "id_sim_max",
                                              "id_match_rate", "clip_score_mean", "gen_json", "t_score")}  # fmt: skip
        for i in range(len(df)):
            t0 = time.perf_counter()
            pngs = df.at[i, "out_pngs"]
            if df.at[i, "status"] == "ok" and pngs is not None:
                try:
                    ref = np.asarray(json.loads(df.at[i, "face_json"])["embedding"], np.float32)
                    images = [_decode_png(p) for p in pngs]
                    sims, matches, gens = [], [], []
                    for k, img in enumerate(images):
                        gen = {"gen_index": k, "detected": False, "id_sim": None, "id_dist": None, "id_match": False}
                        faces = self.analyzer.analyze(img, max_faces=1)
                        if faces and faces[0].embedding is not None:
                            emb = faces[0].embedding
                            dist = float(self.analyzer.distance(emb, ref))
                            gen.update(detected=True, id_sim=identity_similarity(emb, ref), id_dist=dist,
                                       id_match=bool(dist < self.analyzer.match_threshold))  # fmt: skip
                            sims.append(gen["id_sim"])
                            matches.append(gen["id_match"])
                        gens.append({**gen, "backend": self.analyzer.name})
                    cols["gen_json"][i] = json.dumps(gens)  # one faces/ row each
                    cols["n_generated"][i] = len(images)
                    cols["n_faces_found"][i] = len(sims)
                    if sims:
                        cols["id_sim_mean"][i] = float(np.mean(sims))
                        cols["id_sim_max"][i] = float(np.max(sims))
                    # a generated image without a recognisable face counts as a miss
                    cols["id_match_rate"][i] = float(np.sum(matches)) / len(images)
                    if self.clip is not None:
                        cols["clip_score_mean"][i] = self._clip_score(images, str(df.at[i, "prompt"]))
                except Exception as exc:
                    _fail(df, i, "score_error", f"{type(exc).__name__}: {exc}")
            cols["t_score"][i] = time.perf_counter() - t0
        for c, v in cols.items():
            df[c] = v
        return df


class CustomizeWriteStage:
    """Writes each generated image in one put; the metrics rows, each with its per-generated-image rows in
    ``FACE_ROWS``, go to the job's ``shard_writers``, which write them into faces and metrics shards, as in
    ``stylid run`` (``WriteStage``), and the stage returns their ``status``; without writers it returns the rows."""

    def __init__(self, output_uri: str, config: CustomizeJobConfig, shard_writers: ShardWriters | None = None) -> None:
        self.output_uri = output_uri.rstrip("/")
        self.config = config
        self.suffix = config.config_hash()
        self.shard_writers = shard_writers

    def __call__(self, df: pd.DataFrame) -> pa.Table:
        df = df.reset_index(drop=True).copy()
        opts = self.config.io.storage_options
        face_rows: list[list[dict]] = [[] for _ in range(len(df))]
        for i in range(len(df)):
            pngs = df.at[i, "out_pngs"]
            if pngs is None or df.at[i, "status"] != "ok":
                continue
            uris = []
            try:
                for k, png in enumerate(pngs):
                    key = object_key(str(df.at[i, "image_id"]))  # ids like ../x or a/b stay under images/
                    uri = join(self.output_uri, "images", f"{key}-{self.suffix}-{k}.png")
                    write_bytes(uri, bytes(png), opts)
                    uris.append(uri)
                df.at[i, "output_uris"] = json.dumps(uris)
            except Exception as exc:
                _fail(df, i, "write_error", f"{type(exc).__name__}: {exc}")
                continue
            gens = df.at[i, "gen_json"] if "gen_json" in df else None
            if isinstance(gens, str):
                face_rows[i] = [{"image_id": df.at[i, "image_id"], **g} for g in json.loads(gens)]
        df["config_hash"] = self.suffix
        out = pd.DataFrame({c: df[c] if c in df else None for c in METRIC_COLUMNS}).astype(METRIC_COLUMNS)
        table = _arrow(out).append_column(pa.field(FACE_ROWS, FACE_ROWS_TYPE), pa.array(face_rows, FACE_ROWS_TYPE))
        return self.shard_writers.hand_off(table) if self.shard_writers else table


_ARROW_OF = {"string": pa.string(), "Int32": pa.int32(), "boolean": pa.bool_(), "Float64": pa.float64()}
#: the type of ``CustomizeWriteStage``'s ``FACE_ROWS`` column (``FACE_COLUMNS`` as Arrow)
FACE_ROWS_TYPE = pa.list_(pa.struct([pa.field(k, _ARROW_OF[v]) for k, v in FACE_COLUMNS.items()]))


def _arrow(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df, preserve_index=False)


#: the write step's tasks: a few rows each, a tenth of a CPU (the stateless last step)
WRITE = StageResources(batch_size=8, num_cpus=0.1)


def customize_chain(
    config: CustomizeJobConfig, output_uri: str = "", shard_writers: ShardWriters | None = None
) -> list[StageSpec]:
    """``stylid customize``'s chain: reference (load, face, embed), generate (the job's own stage), score, write."""
    r = config.resources
    return [
        StageSpec.model(ReferenceStage, {"config": config}, r.reference, "reference"),
        StageSpec.model(CustomizeStage, {"config": config}, r.generate, "generate"),
        StageSpec.model(CustomizeScoreStage, {"config": config}, r.score, "score"),
        StageSpec(CustomizeWriteStage, {"output_uri": output_uri, "config": config, "shard_writers": shard_writers},
                  WRITE, "io", "write"),
    ]  # fmt: skip


def check_customize_fits(config: CustomizeJobConfig, cpus: float, gpus: float, memory: float | None = None) -> None:
    """``ConfigError`` when the reference, generate and score pools and a write task cannot all run at once on
    ``cpus``/``gpus``/``memory`` (the stream would wait forever for the pool that cannot start)."""
    check_chain_fits(customize_chain(config), None, cpus, gpus, memory)


def build_customize_dataset(
    config: CustomizeJobConfig, rows: PendingRows, output_uri: str, shard_writers: ShardWriters | None = None
) -> ray.data.Dataset:
    """The lazy dataset of the plan's pending ``rows`` through ``customize_chain`` (``build_chain``: pools sized
    against the cluster and checked to fit it); its last stage writes the images and hands the metrics and face
    rows to ``shard_writers`` (the dataset then holds their statuses; without writers, the rows themselves)."""
    return build_chain(rows, customize_chain(config, output_uri, shard_writers))


def run_customize(config: CustomizeJobConfig, manifest_uri: str, output_uri: str) -> RunResult:
    """Customize every manifest row not yet in ``output_uri``'s ``metrics/`` shards; Ray must be initialised.

    The plan keeps the pending rows' row groups and done flags (``PendingRows``, blocks of ``input_block_rows``
    after the reference stage's batches), read as the dataset runs. With nothing pending no dataset is built,
    so no stage starts and no model loads."""
    t0 = time.perf_counter()
    opts = config.io.storage_options
    manifest = iter_customize_manifest(manifest_uri, config)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    done, counts = process_pending(
        manifest, output_uri, opts, lambda rows, writers: build_customize_dataset(config, rows, output_uri, writers),
        config.io.rows_per_shard,
        block_rows=lambda n: input_block_rows(n, config.resources.reference.batch_size, cpus),
    )  # fmt: skip
    return RunResult.of(done, counts, time.perf_counter() - t0)

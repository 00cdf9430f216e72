"""``stylid customize`` on Ray Data: reference rows -> load (reference, pose) -> faces -> portraits (GPU actor pool)
-> scores -> outputs, the chain ``customize_chain`` declares on the shared builder (``pipelines.chain``): every
job's ``LoadStage``, ``FaceStage`` and ``WriteStage`` (``pipelines.stages``) around the job's own generate stage and
``ScoreStage``, configured for k generated images a row against the reference (``stylid score``'s re-detection
rule, ``redetect``).

Manifest columns: ``reference_uri``, ``prompt``, optional ``image_id``, ``pose_uri``, ``num_images``. Every row
comes out once in the ``metrics/part-<h>.parquet`` shards with ``status`` (``ok`` or a reason) and ``error``;
generated images go to ``<output>/images/<object_key(image_id)>-<hash>-<k>.png`` (``put_image``: one put each)
and one row per generated image to ``faces/part-<h>.parquet``. The shards and the resume ledger are
``stylid run``'s (``stylid_core.ledger``): a rerun processes only the ids not yet in ``metrics/`` and, with none
left, starts no stage. ``run.json`` and ``_SUCCESS`` are written by ``jobs.customize``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from pipelines.chain import StageSpec, build_chain, check_chain_fits
from pipelines.manifest import MANIFEST_BATCH_ROWS, ManifestReader
from pipelines.plan import PendingRows, input_block_rows
from pipelines.runner import RunResult, process_pending
from pipelines.schema import CUSTOMIZE_COLUMNS, CUSTOMIZE_FACE_COLUMNS, CUSTOMIZE_METRICS_COLUMNS
from pipelines.stages import (
    FaceStage,
    FrameStage,
    ImageColumn,
    LoadStage,
    Outputs,
    Row,
    ScoreStage,
    WriteStage,
    _fail,
    face_records,
    image_of,
)
from stylid_core.config import ScoreConfig, StageResources
from stylid_core.customize.base import CUSTOMIZERS
from stylid_core.customize.job_config import CustomizeJobConfig
from stylid_core.faces.base import Face

if TYPE_CHECKING:
    from pipelines.shard_writers import ShardWriters

log = logging.getLogger(__name__)

#: manifest columns read on the driver (the rest of a manifest stays on storage)
MANIFEST_COLUMNS = ("image_id", "reference_uri", "prompt", "pose_uri", "num_images")


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


def _seed(image_id: str) -> int:
    return int(hashlib.sha256(str(image_id).encode()).hexdigest()[:8], 16)


#: the images of a customize row, read by every job's ``LoadStage``: the reference (required: an empty
#: ``reference_uri`` is a ``missing`` row) and the target pose where given
CUSTOMIZE_IMAGES: tuple[ImageColumn, ...] = (
    ImageColumn("reference_uri", "ref_pixels"),
    ImageColumn("pose_uri", "pose_pixels", required=False),
)


def reference_face(row: Row) -> Face:
    """The reference's face as ``FaceStage`` found it (its largest), with dense landmarks where the backend had
    them."""
    record = face_records(row)[0]
    face = Face.from_dict(record)
    if record.get("landmarks") is not None:
        face.landmarks = np.asarray(record["landmarks"], np.float32)
    return face


class CustomizeStage(FrameStage):
    """GPU actor stage, the job's own: the configured ``Customizer`` generates ``num_images`` portraits per ok row
    (raw pixels on, as the reference came)."""

    adds = ("model", "gen_pixels", "gen_width", "gen_height", "t_generate")
    columns = CUSTOMIZE_COLUMNS

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.customizer = CUSTOMIZERS.create(config.backend, config=dict(config.options))

    def rows(self, rows: list[Row]) -> list[Row]:
        self.start(rows)
        for row in rows:
            row["model"] = self.customizer.model
            if row["status"] != "ok":
                continue
            t0 = time.perf_counter()
            try:
                pose = image_of(row, "pose_pixels") if isinstance(row.get("pose_pixels"), bytes) else None
                images = self.customizer.generate(
                    image_of(row, "ref_pixels"), reference_face(row), str(row["prompt"]),
                    num_images=int(row["num_images"]), pose=pose, seed=_seed(row["image_id"]),
                )  # fmt: skip
                images = [np.ascontiguousarray(img, np.uint8) for img in images]
                row["gen_pixels"] = [img.tobytes() for img in images]
                row["gen_height"] = [img.shape[0] for img in images]
                row["gen_width"] = [img.shape[1] for img in images]
            except Exception as exc:
                _fail(row, "generate_error", f"{type(exc).__name__}: {exc}")
            row["t_generate"] = time.perf_counter() - t0
        return rows


#: what ``stylid customize``'s ``WriteStage`` writes of a row: its k generated images (``gen_pixels``) as PNG,
#: keyed ``<object_key(id)>-<config hash>-<k>`` and listed in ``output_uris``; its metrics row
#: (``CUSTOMIZE_METRICS_COLUMNS``, the ledger) and a faces/ row per generated image (``gen_json``:
#: ``CUSTOMIZE_FACE_COLUMNS``)
CUSTOMIZE_OUTPUTS = Outputs(
    pixels="gen_pixels", many=True, metrics=tuple(CUSTOMIZE_METRICS_COLUMNS), faces=CUSTOMIZE_FACE_COLUMNS,
    face_rows="gen_json", ext="png",
)  # fmt: skip


#: the write step's tasks: a few rows each, a tenth of a CPU (the stateless last step)
WRITE = StageResources(batch_size=8, num_cpus=0.1)
#: the load step's tasks: the reference stage's batches, a tenth of a CPU each (reads wait on I/O; a decode is
#: milliseconds beside a generation)
LOAD_CPUS = 0.1


def customize_chain(
    config: CustomizeJobConfig, output_uri: str = "", shard_writers: ShardWriters | None = None
) -> list[StageSpec]:
    """``stylid customize``'s chain: every job's ``LoadStage`` (reference and pose) and ``FaceStage`` (the
    reference's largest face, on the ``reference`` resources), generate (the job's own stage), score, write."""
    r = config.resources
    load = {"io": config.io, "images": CUSTOMIZE_IMAGES}
    faces = {"faces": config.faces, "max_faces": 1, "landmarks": True}
    # every job's score stage, for k generated images a row against the reference (stylid score's re-detection)
    score = {"faces": config.faces, "score": ScoreConfig(), "io": config.io, "generated": "gen_pixels",
             "clip_model": config.clip_model}  # fmt: skip
    load_resources = StageResources(batch_size=r.reference.batch_size, num_cpus=LOAD_CPUS)
    write = {"output_uri": output_uri.rstrip("/"), "config_hash": config.config_hash(),
             "key_suffix": f"-{config.config_hash()}", "io": config.io, "shard_writers": shard_writers,
             "outputs": CUSTOMIZE_OUTPUTS}  # fmt: skip
    return [
        StageSpec(LoadStage, load, load_resources, "io", "load"),
        StageSpec.model(FaceStage, faces, r.reference, "reference"),
        StageSpec.model(CustomizeStage, {"config": config}, r.generate, "generate"),
        StageSpec.model(ScoreStage, score, r.score, "score"),
        StageSpec(WriteStage, write, WRITE, "io", "write"),
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

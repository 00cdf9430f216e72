"""FaceSnap training on Ray: a Ray Data stage that builds training pairs, and a Ray Train ``TorchTrainer`` loop.

The same code runs as one CPU process in tests and as N GPU workers on a cluster (``num_workers``, ``use_gpu``).
Checkpoints (``facesnap.safetensors`` + JSON + optimiser state) go to ``<storage_path>/<name>/`` on any fsspec
URI; a rerun with the same storage path and name resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.train
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.chain import CPU, StageSpec, build_chain
from pipelines.manifest import MANIFEST_BATCH_ROWS, ManifestReader
from pipelines.plan import input_block_rows
from pipelines.stages import string_column
from stylid_core.config import StageResources
from stylid_core.customize.facesnap.training import (
    FacePairExtractor,
    FaceSnapTrainConfig,
    FaceSnapTrainer,
    cross_photo_reference_array,
    person_keys,
)
from stylid_core.imageio import decode_image
from stylid_core.storage import read_bytes

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("target", "target_landmarks", "reference_crop", "reference_landmarks", "embedding")
#: the photo each row's reference comes from (``cross_photo_reference_array``), added to the manifest rows on the
#: driver
REFERENCE_COLUMN = "pair_reference_uri"


class FacePairStage:
    """Ray Data stage: manifest rows (image URI, reference URI, optional caption) -> training pairs; rows without a
    face are dropped from the training set (and counted in the ``pairs_skipped`` log line)."""

    def __init__(self, config: dict[str, Any], clip_size: int, face_embed_dim: int, num_landmarks: int) -> None:
        self.config = FaceSnapTrainConfig.from_dict(config)
        self.extractor = FacePairExtractor(self.config, clip_size, face_embed_dim, num_landmarks)

    def _read(self, uri: str) -> np.ndarray:
        return decode_image(read_bytes(uri, self.config.storage_options), source=uri)  # transient errors retried

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, list] = {k: [] for k in (*PAIR_COLUMNS, "caption")}
        uris = batch[cfg.image_column]
        references = batch.get(REFERENCE_COLUMN)
        captions = batch.get(cfg.caption_column) if cfg.caption_column else None
        skipped = 0
        for i, uri in enumerate(uris):
            try:
                image = self._read(str(uri))
                ref_uri = str(uri) if references is None or references[i] is None else str(references[i])
                reference = None if ref_uri == str(uri) else self._read(ref_uri)
                pair = self.extractor(image, seed=zlib.crc32(f"{cfg.seed}:{uri}".encode()), reference=reference)
            except Exception as exc:  # a bad row must not stop training
                log.warning("training pair from %s failed: %s", uri, exc)
                pair = None
            if pair is None:
                skipped += 1
                continue
            for k in PAIR_COLUMNS:
                out[k].append(pair[k])
            caption = None if captions is None else captions[i]
            out["caption"].append(str(caption) if caption else cfg.default_caption)
        if skipped:
            log.info("pairs_skipped=%d", skipped)
        if not out["caption"]:
            return {}
        return {k: (np.stack(v) if k != "caption" else np.array(v, dtype=object)) for k, v in out.items()}


#: rows of a training pair stage's batch (each a photo to read, find a face in and crop)
PAIR_BATCH_ROWS = 4


class TrainingPairRows:
    """The manifest's training rows, streamed: its image and caption columns (whichever exist) read by pyarrow in
    projected batches of ``batch_rows`` (``ManifestReader``), each with its ``REFERENCE_COLUMN``: another photo of
    the same person where the manifest has ``config.person_column`` and the person has several photos
    (``cross_photo_reference_array``), else the row's own photo. Iterable any number of times.

    The references need every row's person at once: one first pass reads the image and person columns only (two
    Arrow string columns on the driver); the rows, with their captions, then stream batch by batch."""

    def __init__(self, config: FaceSnapTrainConfig, batch_rows: int = MANIFEST_BATCH_ROWS) -> None:
        self.config = config
        image, caption, person = config.image_column, config.caption_column, config.person_column

        def rows(table: pa.Table) -> pa.Table:  # a photo with no URI is an empty one: its pair fails and is skipped
            kept = {image: pc.fill_null(string_column(table, image), "")}
            if caption and caption in table.column_names:
                kept[caption] = table.column(caption)
            if person and person in table.column_names:
                kept[person] = person_keys(table.column(person))
            return pa.table(kept)

        def reader(columns: tuple[str, ...]) -> ManifestReader:
            return ManifestReader(
                config.manifest, None, config.storage_options, batch_rows, required=image, columns=columns,
                id_columns=(image,), prepare=rows, id_hint="",
            )  # fmt: skip

        self.reader = reader(tuple(c for c in (image, caption) if c))
        self.references: pa.ChunkedArray | None = None
        if person and person in self.reader.dataset.schema.names:
            photos = list(reader((image, person)))
            if photos:
                both = pa.concat_tables(photos)  # the batches' buffers, not copied
                self.references = cross_photo_reference_array(both.column(image), both.column(person), config.seed)
            else:
                self.references = pa.chunked_array([], pa.string())
        self.num_rows = len(self.references) if self.references is not None else self.reader.dataset.count_rows()

    def __iter__(self) -> Iterator[pa.Table]:
        offset = 0
        for table in self.reader:
            n = table.num_rows
            own = table.column(self.config.image_column)
            refs = own if self.references is None else self.references.slice(offset, n)
            offset += n
            yield table.append_column(REFERENCE_COLUMN, refs)
        if self.references is not None and offset != len(self.references):
            raise RuntimeError(f"manifest {self.config.manifest} changed while it was read")


def pair_blocks(config: FaceSnapTrainConfig, cpus: float, batch_rows: int = MANIFEST_BATCH_ROWS) -> list:
    """``TrainingPairRows`` put into Ray's object store batch by batch, as blocks of ``input_block_rows`` (one ref
    a block, for ``ray.data.from_arrow_refs``); the driver never holds the rows with their captions all at once.
    Ray must be initialised."""
    rows = TrainingPairRows(config, batch_rows)
    per_block = input_block_rows(rows.num_rows, PAIR_BATCH_ROWS, cpus)
    return [ray.put(table.slice(k, per_block)) for table in rows for k in range(0, table.num_rows, per_block)]


def pair_chain(
    config: FaceSnapTrainConfig, clip_size: int, face_embed_dim: int, num_landmarks: int
) -> list[StageSpec]:
    """The training-pair pass as a chain: ``FacePairStage`` on numpy batches of ``PAIR_BATCH_ROWS``, ``pair_cpus``
    each, a pool growing from one actor to ``pair_actors``."""
    kwargs = {"config": config.to_dict(), "clip_size": clip_size, "face_embed_dim": face_embed_dim,
              "num_landmarks": num_landmarks}  # fmt: skip
    resources = StageResources(batch_size=PAIR_BATCH_ROWS, num_cpus=config.pair_cpus)
    return [StageSpec(FacePairStage, kwargs, resources, CPU, "pairs", batch_format="numpy",
                      max_actors=config.pair_actors)]  # fmt: skip


def pair_dataset(config: FaceSnapTrainConfig, clip_size: int, face_embed_dim: int, num_landmarks: int):
    """The Ray Dataset of training pairs from ``config.manifest`` (``pair_blocks`` through ``pair_chain`` on
    ``build_chain``)."""
    cluster = ray.cluster_resources()
    rows = ray.data.from_arrow_refs(pair_blocks(config, cluster.get("CPU", 1.0)))
    return build_chain(rows, pair_chain(config, clip_size, face_embed_dim, num_landmarks), cluster=cluster)


def latest_checkpoint(config: FaceSnapTrainConfig) -> str | None:
    """The newest checkpoint folder (highest step) under ``<storage_path>/<name>``, as a URI; None if there is none."""
    fs, root = fsspec.core.url_to_fs(config.storage_path, **config.storage_options)
    fs.invalidate_cache()  # object stores' listings are cached per process; Ray Train's workers wrote these
    best: tuple[int, str] | None = None
    for marker in fs.glob(f"{root.rstrip('/')}/{config.name}/*/train_progress.json"):
        with fs.open(marker, "r") as f:
            step = int(json.load(f)["step"])
        folder = marker.rsplit("/", 1)[0]
        if best is None or step > best[0]:
            best = (step, folder)
    if best is None:
        return None
    return fs.unstrip_protocol(best[1])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the trainer, resume, then step until ``max_steps``, checkpointing as it goes."""
    import torch
    from ray.train.torch import get_device, prepare_model

    config = FaceSnapTrainConfig.from_dict(loop_config["train"])
    device = get_device()
    trainer = FaceSnapTrainer(config, device=device)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load(d)
    elif loop_config.get("resume_from"):
        trainer.load(loop_config["resume_from"], config.storage_options)
    model = trainer.model
    if ray.train.get_context().get_world_size() > 1:
        model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    last: dict[str, float] = {}
    while trainer.step < config.max_steps:
        seen = 0
        for batch in shard.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            seen += 1
            last = trainer.train_step(batch, model)
            due = trainer.step % config.checkpoint_every == 0 or trainer.step >= config.max_steps
            metrics = {**last, "step": trainer.step}
            if due:
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:
                        trainer.save(tmp)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if trainer.step >= config.max_steps:
                break
        if seen == 0:
            raise RuntimeError("the training set is empty (no faces found in the manifest's images?)")
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _storage(config: FaceSnapTrainConfig) -> tuple[str, pafs.FileSystem | None]:
    fs, root = fsspec.core.url_to_fs(config.storage_path, **config.storage_options)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(root, exist_ok=True)
        return os.path.abspath(root), None
    return root, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run_training(config: FaceSnapTrainConfig) -> dict[str, Any]:
    """Train (or resume) FaceSnap; returns the final metrics and the URI of the newest checkpoint."""
    from stylid_core.customize.facesnap.components import tiny_components

    # module sizes are needed by the data stage: read them without building the full model where possible
    if config.model is not None:
        model_cfg = config.model
    elif config.tiny is not None:
        from stylid_core.customize.facesnap.engine import tiny_model_config

        model_cfg = tiny_model_config(tiny_components(config.tiny))
    else:
        from stylid_core.customize.facesnap.config import FaceSnapModelConfig

        model_cfg = FaceSnapModelConfig()
    clip_size = _clip_image_size(config)
    resume_from = latest_checkpoint(config)
    if resume_from:
        log.info("resuming from %s", resume_from)
    storage_path, storage_fs = _storage(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config.to_dict(), "resume_from": resume_from},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": pair_dataset(config, clip_size, model_cfg.face_embed_dim, model_cfg.num_landmarks)},
    )
    result = trainer.fit()
    return {"metrics": dict(result.metrics or {}), "checkpoint": latest_checkpoint(config)}


def _clip_image_size(config: FaceSnapTrainConfig) -> int:
    if config.tiny is not None:
        return config.tiny.vision_image_size
    from transformers import CLIPVisionConfig

    path = config.image_encoder
    sub = None
    if ":" in path and not os.path.exists(path):
        path, sub = path.rsplit(":", 1)
    return CLIPVisionConfig.from_pretrained(path, **({"subfolder": sub} if sub else {})).image_size
